"""Pretrained backbones from keras-cv presets (issue 28, Deliver 2): ``--arch=keras_cv:<preset>
--weights=<preset>`` trains a teacher whose backbone starts from the preset's weights, the saved
net reloads, and a student distils from it. The preset is a tiny one the test saves to disk;
nothing downloads (every download path of keras-cv and any socket raise)."""

from __future__ import annotations

import json
import os
import socket

import keras
import numpy as np
import pytest

from kd_histo.cli import flags_common as fc
from kd_histo.cli import train as train_cli
from kd_histo.data.pipeline import PipelineConfig
from kd_histo.evaluation.cost import count_flops
from kd_histo.models import NetConfig, build_model, load_model
from kd_histo.models import keras_cv_backbone as kcv
from kd_histo.training import train
from kd_histo.training.config import DistillConfig, RunConfig
from kd_histo.training.run_record import read_run_record

KW = dict(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
FLAGS = ["--batch_size=4", "--epochs=1", "--steps_per_epoch=2", "--val_steps=1"]
QUIET = ["--profile_steps=0,0", "--verbose=0"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No download can happen: keras-cv's Kaggle and GCS paths and any socket raise."""
    import kagglehub

    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to download: {args}")

    monkeypatch.setattr(kagglehub, "model_download", refuse)
    monkeypatch.setattr(keras.utils, "get_file", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def preset(tmp_path_factory) -> str:
    """A tiny ResNetV1 preset folder (config.json + model.weights.h5), as keras-cv saves one."""
    import keras_cv
    from keras_cv.src.utils.preset_utils import save_to_preset

    keras.utils.set_random_seed(11)
    backbone = keras_cv.models.ResNetBackbone(
        stackwise_filters=[4, 8],
        stackwise_blocks=[1, 1],
        stackwise_strides=[1, 2],
        block_type="block",
        include_rescaling=True,
    )
    folder = str(tmp_path_factory.mktemp("preset") / "tiny_resnet")
    save_to_preset(backbone, folder)
    return folder


def _weights(model):
    return [keras.ops.convert_to_numpy(w) for w in model.weights]


def test_names_resolve_to_handles_without_reading_anything(preset):
    every, with_weights = kcv._presets()
    assert kcv.resolve("resnet50", "imagenet") == every["resnet50_imagenet"]["kaggle_handle"]
    assert kcv.resolve("resnet50", "none") == every["resnet50"]["kaggle_handle"]
    assert kcv.resolve("resnet50", "none").startswith("kaggle://")
    assert kcv.resolve(preset, "none") == preset
    for bad in ("resnet_51", "/no/such/preset", "."):
        with pytest.raises(kcv.KerasCVError, match="keras-cv preset") as e:
            kcv.resolve(bad, "imagenet")
        assert bad in str(e.value) and "\n" not in str(e.value)


def test_a_preset_name_offline_is_refused_in_one_line(monkeypatch):
    import kagglehub
    import requests

    def offline(handle, path):
        raise requests.ConnectionError(f"Failed to resolve 'api.kaggle.com' for {handle}\nmore")

    monkeypatch.setattr(kagglehub, "model_download", offline)
    with pytest.raises(kcv.KerasCVError, match="could not be downloaded") as e:
        kcv.load_backbone("keras_cv:resnet18", "imagenet")
    assert "kaggle://keras/resnetv1/keras/resnet18" in str(e.value)
    assert "give a preset folder" in str(e.value) and "\n" not in str(e.value)


def test_a_preset_with_lambda_layers_is_refused_before_training(tmp_path):
    """CSPDarkNet's activations are Python lambdas: its net would train, then never reload."""
    import keras_cv
    from keras_cv.src.utils.preset_utils import save_to_preset

    backbone = keras_cv.models.CSPDarkNetBackbone(
        stackwise_channels=[4, 8], stackwise_depth=[1, 1], include_rescaling=True
    )
    save_to_preset(backbone, str(tmp_path / "csp"))
    with pytest.raises(kcv.KerasCVError, match="lambda layers") as e:
        build_model(f"keras_cv:{tmp_path / 'csp'}", 4, **KW)
    assert str(tmp_path / "csp") in str(e.value) and "\n" not in str(e.value)


def test_weights_of_another_architecture_are_refused_in_one_line(preset, tmp_path):
    import keras_cv
    from keras_cv.src.utils.preset_utils import save_to_preset

    other = keras_cv.models.ResNetBackbone(
        stackwise_filters=[4, 4],
        stackwise_blocks=[1, 1],
        stackwise_strides=[1, 2],
        block_type="block",
        include_rescaling=True,
    )
    save_to_preset(other, str(tmp_path / "other"))
    with pytest.raises(kcv.KerasCVError, match="do not fit keras-cv preset") as e:
        build_model(f"keras_cv:{preset}", 4, weights=str(tmp_path / "other"), **KW)
    assert str(tmp_path / "other") in str(e.value) and "\n" not in str(e.value)


def test_the_backbone_starts_from_the_presets_weights(preset):
    import keras_cv

    want = _weights(keras_cv.models.Backbone.from_preset(preset))
    for weights in (preset, "imagenet", os.path.join(preset, "model.weights.h5")):
        net = build_model(f"keras_cv:{preset}", 4, weights=weights, **KW)
        np.testing.assert_array_equal(
            np.concatenate([w.ravel() for w in _weights(net.get_layer(kcv.LAYER_NAME))]),
            np.concatenate([w.ravel() for w in want]),
        )
    fresh = build_model(f"keras_cv:{preset}", 4, weights="none", **KW)
    kernels = [w for w in _weights(fresh.get_layer(kcv.LAYER_NAME)) if w.ndim == 4]
    assert not np.array_equal(kernels[0], [w for w in want if w.ndim == 4][0])
    # the preset rescales 0-255 pixels itself: the net feeds it pixels 0-255, not data-set z-scores
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    backbone = keras_cv.models.Backbone.from_preset(preset, input_shape=[None, None, 3])
    np.testing.assert_allclose(
        net(x)["features"].numpy(), backbone(x * 255).numpy(), rtol=1e-5, atol=1e-5
    )


@pytest.fixture(scope="module")
def teacher_run(tiny_shards, preset, tmp_path_factory) -> str:
    model_dir = str(tmp_path_factory.mktemp("kcv") / "teacher")
    argv = [f"--arch=keras_cv:{preset}", f"--weights={preset}", "--mode=teacher", *FLAGS, *QUIET]
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse fixture is not active
        mp.setattr(socket.socket, "connect", lambda *a: pytest.fail(f"download: {a}"))
        code = fc.invoke(
            train_cli.PROG, train_cli.main, [*argv, f"--data_dir={tiny_shards}",
                                             f"--model_dir={model_dir}"]
        )  # fmt: skip
    assert code == 0
    return model_dir


def test_a_teacher_on_a_preset_trains_saves_and_reloads(teacher_run, preset):
    record = read_run_record(teacher_run)
    assert record.arch == f"keras_cv:{preset}"
    np.testing.assert_allclose(record.mean, (0, 0, 0))
    np.testing.assert_allclose(record.std, (1 / 255,) * 3, rtol=1e-6)  # pixels 0-255
    config = json.loads(open(os.path.join(teacher_run, "config.json")).read())
    assert config["net"]["weights"] == preset
    net = load_model(os.path.join(teacher_run, "model.keras"), 4)
    x = np.random.default_rng(1).random((2, 32, 32, 3), dtype=np.float32)
    out = net(x)
    assert out["logits"].shape == (2, 4) and out["features"].shape == (2, 4, 4, 32)
    # trained: the backbone moved off the preset's weights, and the saved file holds the moves
    import keras_cv

    start = _weights(keras_cv.models.Backbone.from_preset(preset))
    assert any(not np.array_equal(a, b) for a, b in zip(start, _weights(net.layers[2])))
    # its cost is the architecture's (what kd-histo-cost and the cascade report)
    fresh = build_model(f"keras_cv:{preset}", 4, **KW)
    assert count_flops(net, 32) == count_flops(fresh, 32) > 0


def test_a_student_distils_from_the_preset_teacher(tiny_shards, teacher_run, tmp_path):
    cfg = RunConfig(
        mode="distill",
        model_dir=str(tmp_path / "student"),
        data=PipelineConfig(tiny_shards, batch_size=4, factor=2, augment="flips"),
        net=NetConfig(planes=(4, 8, 8, 16), stem="small"),  # 16 channels, the teacher's 32
        distill=DistillConfig(teacher=teacher_run),
        epochs=1,
        steps_per_epoch=2,
        val_steps=1,
        verbose=0,
        profile_steps=(0, 0),
        image_grids=False,
    )
    result = train.train(cfg)
    for name in ("kd_loss", "feature_loss"):
        assert all(np.isfinite(result.history[name])) and min(result.history[name]) > 0
    student = load_model(os.path.join(result.model_dir, "model.keras"), 4)
    assert student.output["features"].shape[-1] == 16


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--arch=keras_cv:/no/such/preset"], "keras-cv preset /no/such/preset is not a folder"),
        (["--arch=keras_cv:resnet_51"], "keras-cv preset resnet_51 is no keras-cv backbone"),
        (["--arch=keras_cv:PRESET", "--weights=/no/such.weights.h5"], "/no/such.weights.h5"),
        (["--arch=resnet18", "--weights=imagenet"], "no pretrained weights"),
    ],
)
def test_a_bad_preset_or_weights_is_refused_in_one_line(
    tiny_shards, preset, tmp_path, capsys, flags, words
):
    flags = [f.replace("PRESET", preset) for f in flags]
    model_dir = tmp_path / "m"
    code = fc.invoke(
        train_cli.PROG,
        train_cli.main,
        ["--mode=teacher", f"--data_dir={tiny_shards}", f"--model_dir={model_dir}", *flags,
         *FLAGS, *QUIET],
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err[-1].startswith("kd-histo-train: error: ") and words in err[-1], err
    assert not model_dir.exists()
