"""Foreign teachers (issue 28, Deliver 2): a SavedModel from elsewhere with a teacher.json
distils into a kd_histo student; a teacher.json that does not fit the data is refused in one
line."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest

from kd_histo.data import synthetic
from kd_histo.data.pipeline import PipelineConfig
from kd_histo.models import load_model
from kd_histo.training import preflight, train
from kd_histo.training.config import DistillConfig, NetConfig, RunConfig


def _foreign_savedmodel(folder, **facts) -> str:
    """A model from elsewhere: its own output names, normalised input, exported as SavedModel."""
    keras.utils.set_random_seed(3)
    image = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(image)
    fmap = keras.layers.Conv2D(12, 3, strides=2, padding="same", activation="relu")(x)
    scores = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(fmap))
    model = keras.Model(image, {"class_scores": scores, "fmap": fmap})
    path = os.path.join(str(folder), "foreign_sm")
    model.export(path, verbose=False)
    about = {
        "input_px": 32,
        "mpp": 0.5,
        "class_names": list(synthetic.CLASS_NAMES),
        "logits": "class_scores",
        "features": "fmap",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    }
    about.update(facts)
    with open(os.path.join(path, "teacher.json"), "w") as f:
        json.dump(about, f)
    return path


def _run(data_dir, model_dir, teacher, **distill):
    return RunConfig(
        mode="distill",
        model_dir=str(model_dir),
        data=PipelineConfig(data_dir, batch_size=4, factor=2, augment="flips"),
        net=NetConfig(planes=(4, 8, 8, 16), stem="small"),
        distill=DistillConfig(teacher=teacher, **distill),
        epochs=1,
        steps_per_epoch=2,
        val_steps=1,
        verbose=0,
        profile_steps=(0, 0),
        image_grids=False,
    )


def test_a_foreign_savedmodel_teacher_trains_a_student(tiny_shards, tmp_path):
    teacher = _foreign_savedmodel(tmp_path)
    cfg = _run(tiny_shards, tmp_path / "s", teacher, teacher_cache=str(tmp_path / "cache"))
    result = train.train(cfg)
    for name in ("kd_loss", "feature_loss"):  # the student's 16 channels projected to its 12
        assert all(np.isfinite(result.history[name])) and min(result.history[name]) > 0
    saved = load_model(os.path.join(result.model_dir, "model.keras"), 4)
    assert saved.output["features"].shape[-1] == 16
    # the wrapped teacher reads [0, 1] tiles through teacher.json's normalisation
    info = preflight.check_data(cfg)
    net = preflight.load_teacher(cfg, info)
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    raw = keras.layers.TFSMLayer(teacher, call_endpoint="serve")((x - 0.5) / 0.25)
    np.testing.assert_allclose(
        net(x)["logits"].numpy(), raw["class_scores"].numpy(), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "facts, words",
    [
        ({"class_names": list(synthetic.CLASS_NAMES)[::-1]}, "has classes"),
        ({"mpp": 1.0}, "was trained on 1 µm/px tiles"),
        ({"input_px": 64}, "was trained on 64 px HR tiles"),
        ({"logits": "scores"}, "logits 'scores' is not an output"),
        ({"mpp": "half"}, "a value has the wrong type"),
    ],
)
def test_a_teacher_json_that_does_not_fit_is_refused_in_one_line(
    tiny_shards, tmp_path, facts, words
):
    teacher = _foreign_savedmodel(tmp_path, **facts)
    cfg = _run(tiny_shards, tmp_path / "s", teacher)
    with pytest.raises(preflight.PreflightError, match=words) as e:
        train.train(cfg)
    assert os.path.join(teacher, "teacher.json") in str(e.value)
    assert "\n" not in str(e.value) and not os.path.exists(cfg.model_dir)


def test_a_foreign_keras_file_is_read_through_its_teacher_json(tiny_shards, tmp_path):
    keras.utils.set_random_seed(4)
    image = keras.Input((None, None, 3))
    fmap = keras.layers.Conv2D(6, 3, strides=4, padding="same")(image)
    scores = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(fmap))
    model = keras.Model(image, [fmap, scores])  # outputs by position
    path = str(tmp_path / "other.keras")
    model.save(path)
    about = {"input_px": 32, "mpp": 0.5, "class_names": list(synthetic.CLASS_NAMES),
             "logits": "1", "features": "0"}  # fmt: skip
    (tmp_path / "teacher.json").write_text(json.dumps(about))
    cfg = _run(tiny_shards, tmp_path / "s", path)
    info = preflight.check_data(cfg)
    preflight.check_teacher(cfg, info)
    net = preflight.load_teacher(cfg, info)
    x = np.random.default_rng(1).random((2, 32, 32, 3), dtype=np.float32)
    out = net(x)
    want = model(x)  # no normalisation stated: the tiles as they are
    np.testing.assert_allclose(out["logits"].numpy(), want[1].numpy(), rtol=1e-5, atol=1e-6)
    assert out["features"].shape == (2, 8, 8, 6)
