"""kd-histo-export: the exported SavedModel and TFLite models hold the preprocessing and reproduce
the Keras net's predictions; kd-histo-predict --model runs them."""

import csv
import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from support import TINY_PLANES, tiny_run_config, write_tiny_shards

from kd_histo.cli import export as export_cli
from kd_histo.cli import flags_common as fc
from kd_histo.cli import predict as predict_cli
from kd_histo.data.pipeline import PipelineConfig, make_dataset
from kd_histo.data.stain_norm import StainReference
from kd_histo.data.views import resize
from kd_histo.evaluation.export import EXPORT_JSON, ExportConfig, export, read_export_record
from kd_histo.evaluation.exported import ExportedModel
from kd_histo.models import build_model, load_model
from kd_histo.training import train
from kd_histo.training.config import OptimConfig
from kd_histo.training.run_record import RunRecord, read_run_record, write_run_record

BATCH = 16  # the TFLite graphs' fixed batch: the 64 test tiles are 4 batches, 40 leave a short one


def _train(root, epochs: int, steps: int, **optim) -> tuple[str, str]:
    """A tiny baseline x2 (an LR-view net: both signatures) on 32 px synthetic shards without a
    val split (so the run keeps its last network, not an early best one)."""
    data = write_tiny_shards(root / "shards", per_class=32)
    for p in (root / "shards").glob("val-*"):
        p.unlink()
    info = json.loads((root / "shards" / "dataset.json").read_text())
    del info["counts"]["val"], info["shards"]["val"]
    (root / "shards" / "dataset.json").write_text(json.dumps(info))
    run = root / "baseline_x2"
    pipe = PipelineConfig(data, batch_size=16, factor=2, augment="none")
    cfg = tiny_run_config(
        data, run, mode="baseline", data=pipe, epochs=epochs, steps_per_epoch=steps
    )
    train.train(dataclasses.replace(cfg, optim=OptimConfig(**optim), allow_no_val=True))
    return data, str(run)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Trained for 2 x 2 steps: enough for the float formats' equality with the Keras net."""
    return _train(tmp_path_factory.mktemp("export"), 2, 2)


@pytest.fixture(scope="module")
def decisive(tmp_path_factory):
    """Trained for 8 x 8 steps at lr 1e-2 (training accuracy ~100%): a net whose top-1 is
    decided, for the quantized formats' agreement targets."""
    return _train(tmp_path_factory.mktemp("decisive"), 8, 8, learning_rate=1e-2)


def _tiles(data, run):
    """The test split's HR tiles (uint8, as decoded), their LR view read back as uint8, and the
    Keras net's probabilities on the LR view made as training does (float resize) and on the
    uint8 LR tiles."""
    ds = make_dataset(PipelineConfig(data, batch_size=64), "test", training=False)
    hr = np.concatenate([np.round(b["hr"].numpy() * 255).astype(np.uint8) for b in ds])
    net = load_model(os.path.join(run, "model.keras"))
    lr_float = resize(tf.image.convert_image_dtype(hr, tf.float32), 16)
    lr = np.round(lr_float.numpy() * 255).astype(np.uint8)

    def probs(x):
        return tf.nn.softmax(net(x, training=False)["logits"]).numpy()

    return hr, lr, probs(lr_float), probs(tf.image.convert_image_dtype(lr, tf.float32))


@pytest.fixture(scope="module")
def test_tiles(trained):
    return _tiles(*trained)


@pytest.fixture(scope="module")
def exports(trained, tmp_path_factory):
    """{(format, quantize): folder} of the trained run, through the binary."""
    _, run = trained
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for fmt, q in [("savedmodel", "none"), ("tflite", "none")]:
        out[fmt, q] = str(root / f"{fmt}_{q}")
        argv = [f"--model_dir={run}", f"--format={fmt}", f"--quantize={q}", f"--out={out[fmt, q]}"]
        assert fc.invoke(export_cli.PROG, export_cli.main, [*argv, f"--batch_size={BATCH}"]) == 0
    return out


def _agreement(a, b) -> float:
    return float(np.mean(a.argmax(1) == b.argmax(1)))


def test_savedmodel_reproduces_the_keras_net(exports, test_tiles):
    hr, lr, keras_hr, keras_lr = test_tiles
    m = ExportedModel(exports["savedmodel", "none"])
    # uint8 tiles at the run's input µm/px: the net on training's uint8 -> [0, 1] conversion
    np.testing.assert_allclose(m.probabilities(lr), keras_lr, atol=1e-5)
    # HR tiles: the graph resizes as training made the LR view, then runs the same net
    np.testing.assert_allclose(m.probabilities(hr, "hr"), keras_hr, atol=1e-5)
    assert m.probabilities(hr[:40], "hr").shape == (40, 4)  # any batch size


def test_tflite_reproduces_the_keras_net_through_xnnpack(exports, test_tiles):
    hr, lr, keras_hr, keras_lr = test_tiles
    m = ExportedModel(exports["tflite", "none"])
    got_lr, got_hr = m.probabilities(lr), m.probabilities(hr[:40], "hr")  # 40: a padded batch
    assert m.xnnpack_delegated()  # TFLite's default CPU delegate took the graph
    np.testing.assert_allclose(got_lr, keras_lr, atol=1e-4)
    np.testing.assert_allclose(got_hr, keras_hr[:40], atol=1e-4)


# int8 misses its target on this tiny net (4-16 channels): 83% of the test tiles and 95% of the
# training tiles agree (2026-12-04); full-integer GroupNorm is the lossy part (BUILD_NOTES.md,
# "Exported models"). Kept as a strict expected failure, so the day it passes is seen.
INT8_MISSES = pytest.mark.xfail(strict=True, reason="int8 agreement < 98% on the tiny GN net")


@pytest.mark.large
@pytest.mark.parametrize(
    "quantize,target", [("float16", 0.995), pytest.param("int8", 0.98, marks=INT8_MISSES)]
)
def test_quantized_tflite_agrees_with_the_keras_net(decisive, tmp_path, quantize, target):
    data, run = decisive
    hr, lr, keras_hr, keras_lr = _tiles(data, run)
    export(ExportConfig(run, str(tmp_path / quantize), "tflite", quantize, batch_size=BATCH))
    m = ExportedModel(str(tmp_path / quantize))
    assert _agreement(m.probabilities(lr), keras_lr) >= target
    assert _agreement(m.probabilities(hr, "hr"), keras_hr) >= target
    assert m.xnnpack_delegated()


def test_int8_calibrates_on_the_runs_training_tiles(trained, test_tiles, tmp_path):
    data, run = trained
    hr, lr, _, _ = test_tiles
    export(ExportConfig(run, str(tmp_path / "int8"), "tflite", "int8", batch_size=BATCH))
    m = ExportedModel(str(tmp_path / "int8"))
    n_train = json.load(open(os.path.join(data, "dataset.json")))["counts"]["train"]
    assert m.record.calibration_tiles == sum(n_train.values())  # all of them (< 256)
    assert m.xnnpack_delegated()  # XNNPACK runs the int8 graph too
    for p in (m.probabilities(lr), m.probabilities(hr, "hr")):
        assert p.shape == (len(hr), 4) and np.allclose(p.sum(1), 1, atol=0.02)


def test_the_folder_holds_the_run_record_and_the_input_contract(exports, trained):
    _, run = trained
    record = read_run_record(run)
    for (fmt, q), folder in exports.items():
        with open(os.path.join(folder, "run.json"), "rb") as a, open(f"{run}/run.json", "rb") as b:
            assert a.read() == b.read()
        e = read_export_record(folder)
        assert (e.format, e.quantize, e.class_names) == (fmt, q, record.class_names)
        assert e.batch_size == (None if fmt == "savedmodel" else BATCH)
        own, hr = e.inputs
        assert (own.signature, own.px, own.mpp, own.dtype) == ("serving_default", 16, 1.0, "uint8")
        assert (hr.signature, hr.px, hr.mpp, hr.resize) == ("hr", 32, 0.5, "area x2")
        assert os.path.exists(os.path.join(folder, e.model))
    assert not [p for p in os.listdir(os.path.dirname(folder)) if ".tmp-" in p]


def _predicted(tmp_path, capsys, name, *model_flag, inputs):
    out = tmp_path / name
    argv = [*model_flag, f"--inputs={inputs}", f"--out_dir={out}", "--split=test"]
    assert fc.invoke(predict_cli.PROG, predict_cli.main, argv) == 0, capsys.readouterr().err
    return [r["pred"] for r in csv.DictReader(open(out / "predictions.csv"))]


def test_predict_runs_the_exported_model_with_the_run_dirs_classes(
    exports, trained, tmp_path, capsys
):
    from PIL import Image

    data, run = trained
    folder = tmp_path / "tiles" / "caseA"  # HR tiles in a folder: the "hr" signature
    folder.mkdir(parents=True)
    ds = make_dataset(PipelineConfig(data, batch_size=8), "train", training=False)
    for i, im in enumerate(next(iter(ds))["hr"].numpy()):
        Image.fromarray(np.round(im * 255).astype(np.uint8)).save(folder / f"t{i}.png")
    inputs = f"{data},{tmp_path / 'tiles'}"
    expected = _predicted(tmp_path, capsys, "run", f"--model_dir={run}", inputs=inputs)
    assert len(expected) == 64 + 8
    for key in (("savedmodel", "none"), ("tflite", "none")):
        got = _predicted(tmp_path, capsys, key[0], f"--model={exports[key]}", inputs=inputs)
        assert got == expected, key


def _hand_made_run(root, **record) -> str:
    """A run folder of an untrained tiny net (run.json written by hand)."""
    ref = record.pop("stain_reference", None)
    net = build_model(
        "resnet_gn",
        3,
        mean=(0.6, 0.5, 0.7),
        std=(0.2, 0.2, 0.2),
        planes=TINY_PLANES,
        stem="small",
        stain_reference=ref,
    )
    os.makedirs(root, exist_ok=True)
    net.save(os.path.join(root, "model.keras"))
    fields = dict(mode="teacher", view="hr", factor=1.0, lr_method="area", hr_px=24, input_px=24)
    fields.update(record)
    write_run_record(
        root,
        RunRecord(
            **fields,
            mpp=None,
            class_names=("a", "b", "c"),
            mean=(0.6, 0.5, 0.7),
            std=(0.2, 0.2, 0.2),
            stain_reference=ref,
        ),
    )
    return str(root)


def test_a_stain_normalised_net_exports_with_its_normalisation(tmp_path):
    ref = StainReference("reinhard", mean=(8.0, 0.02, 0.01), std=(0.5, 0.05, 0.03))
    run = _hand_made_run(tmp_path / "run", stain_reference=ref)
    export(ExportConfig(run, str(tmp_path / "sm")))
    m = ExportedModel(str(tmp_path / "sm"))
    assert [c.signature for c in m.record.inputs] == ["serving_default"]  # a teacher: HR only
    assert m.record.inputs[0].mpp is None  # the run's µm/px is unknown, and says so
    tiles = np.random.default_rng(0).integers(0, 256, (6, 24, 24, 3), np.uint8)
    tiles[:3, :12] = (120, 60, 150)  # stained pixels for Reinhard's statistics
    net = load_model(os.path.join(run, "model.keras"))
    keras = tf.nn.softmax(net(tf.image.convert_image_dtype(tiles, tf.float32))["logits"]).numpy()
    np.testing.assert_allclose(m.probabilities(tiles), keras, atol=1e-5)
    # TFLite holds Reinhard too (the layer's map has a static element shape in a fixed graph);
    # its masks make dynamic-sized tensors, so XNNPACK leaves that graph to TFLite's kernels.
    export(ExportConfig(run, str(tmp_path / "tfl"), "tflite", batch_size=4))
    np.testing.assert_allclose(
        ExportedModel(str(tmp_path / "tfl")).probabilities(tiles), keras, atol=1e-5
    )


def test_a_macenko_net_is_refused_by_tflite_in_one_line(tmp_path):
    ref = StainReference(
        "macenko", stain_matrix=(0.65, 0.7, 0.29, 0.07, 0.99, 0.11), max_concentration=(1.9, 1.0)
    )
    run = _hand_made_run(tmp_path / "run", stain_reference=ref)
    with pytest.raises(ValueError, match="export --format=savedmodel instead") as e:
        export(ExportConfig(run, str(tmp_path / "tfl"), "tflite", batch_size=4))
    assert "\n" not in str(e.value) and "SelfAdjointEig" in str(e.value)
    assert not os.path.exists(tmp_path / "tfl") and os.listdir(tmp_path) == ["run"]


def test_refusals_are_one_line(tmp_path, capsys):
    run = _hand_made_run(tmp_path / "run", data_dir=str(tmp_path / "gone"))

    def refused(*argv) -> str:
        assert fc.invoke(export_cli.PROG, export_cli.main, [f"--model_dir={run}", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("kd-histo-export: error:") and "\n" not in err, err
        return err

    assert str(tmp_path / "gone") in refused("--format=tflite", "--quantize=int8", "--out=x")
    assert "SavedModel" in refused("--quantize=int8", f"--out={tmp_path / 'y'}")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine\n")
    assert "no kd-histo-export folder" in refused(f"--out={tmp_path / 'taken'}")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine\n"
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")
    argv = [f"--model={tmp_path / 'taken'}", f"--inputs={tmp_path}"]
    assert fc.invoke(predict_cli.PROG, predict_cli.main, argv) == 2
    assert EXPORT_JSON in capsys.readouterr().err
