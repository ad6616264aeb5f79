"""The typed run record: round trip, old run.json files, paths kept inside the run folder, and
evaluation/prediction making the LR view with the run's own lr_method."""

from __future__ import annotations

import csv
import dataclasses
import json
import os

import numpy as np
import pytest
from support import SYNTHETIC_NAMES, run_record

from kd_histo.training import run_record as rr
from kd_histo.training.run_record import (
    RunRecord,
    RunRecordError,
    read_run_record,
    write_run_record,
)

NAMES = SYNTHETIC_NAMES


def record(**changes) -> RunRecord:
    extra = dict(
        lr_method="bicubic",
        arch="resnet_gn",
        monitor="val_accuracy",
        best=0.5,
        epochs=2,
        epochs_run_this_process=2,
        data_dir="data",
    )
    return run_record(**{**extra, **changes})


def make_run(tmp_path, name="run", **changes) -> str:
    """A run folder made by hand: a tiny untrained net saved as model.keras, and its record."""
    from kd_histo.models import build_model

    rec = record(**changes)
    d = tmp_path / name
    d.mkdir()
    net = build_model(
        "resnet_gn",
        len(rec.class_names),
        mean=rec.mean,
        std=rec.std,
        planes=(4, 8, 8, 16),
        stem="small",
    )
    net.save(str(d / "model.keras"))
    write_run_record(str(d), rec)
    return str(d)


def test_round_trip_keeps_every_field_including_lr_method(tmp_path):
    rec = record(lr_method="pyramid", mpp=None, diverged_at_epoch=3)
    path = write_run_record(str(tmp_path), rec)
    assert os.listdir(tmp_path) == ["run.json"]  # the temporary file was renamed, none left
    back = read_run_record(str(tmp_path))
    assert back == rec and back.lr_method == "pyramid" and back.mpp is None
    assert json.load(open(path))["lr_method"] == "pyramid"
    assert isinstance(back.class_names, tuple) and back.class_names == NAMES


def test_input_mpp_is_mpp_times_factor():
    assert record(mpp=0.5, factor=4.0, input_px=8).input_mpp == pytest.approx(2.0)
    assert record(
        mode="teacher", view="hr", factor=1.0, input_px=32, mpp=0.25
    ).input_mpp == pytest.approx(0.25)
    assert record(mpp=None).input_mpp is None


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"mode": "teacher"}, "view"),  # a teacher reads HR tiles
        ({"mode": "teacher", "view": "hr", "factor": 2.0}, "factor"),
        ({"lr_method": "nearest"}, "lr_method"),
        ({"mpp": 0.0}, "mpp"),
        ({"class_names": ("a", "a")}, "unique"),
        ({"std": (0.1, 0.0, 0.1)}, "std"),
    ],
)
def test_wrong_facts_are_refused(changes, words):
    with pytest.raises(RunRecordError, match=words):
        record(**changes)


def test_unknown_fields_and_newer_versions_are_refused(tmp_path):
    d = record().to_dict()
    (tmp_path / "run.json").write_text(json.dumps({**d, "tile_overlap": 0.5}))
    with pytest.raises(RunRecordError, match="tile_overlap.*upgrade"):
        read_run_record(str(tmp_path))
    (tmp_path / "run.json").write_text(json.dumps({**d, "record_version": rr.RECORD_VERSION + 1}))
    with pytest.raises(RunRecordError, match="upgrade"):
        read_run_record(str(tmp_path))
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(RunRecordError, match="not valid JSON"):
        read_run_record(str(tmp_path))


def _old_run_json(rec: RunRecord) -> dict:
    """run.json as kd_histo.training.train wrote it before the typed record."""
    d = rec.to_dict()
    for k in ("lr_method", "mpp", "mean", "std", "record_version"):
        del d[k]
    return d


def test_a_run_json_from_before_the_typed_record_is_refused_in_one_line(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps(_old_run_json(record())))
    with pytest.raises(RunRecordError, match="no record_version.*retrain") as e:
        read_run_record(str(tmp_path))
    assert "run.json" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.reliability
def test_model_path_stays_inside_the_run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    outside = tmp_path / "elsewhere.keras"
    outside.write_text("x")
    assert record().model_path(str(run)) == os.path.join(str(run), "model.keras")
    assert record(model="nets/best.keras").model_path(str(run)) == os.path.join(
        str(run), "nets/best.keras"
    )
    for bad in (str(outside), "../elsewhere.keras", "nets/../../elsewhere.keras"):
        with pytest.raises(RunRecordError, match="outside the run folder"):
            record(model=bad).model_path(str(run))
    os.symlink(outside, run / "link.keras")
    with pytest.raises(RunRecordError, match="link leading outside"):
        record(model="link.keras").model_path(str(run))
    os.symlink(tmp_path, run / "up")  # a folder link: the file lies out of the run folder too
    with pytest.raises(RunRecordError, match="outside"):
        record(model="up/elsewhere.keras").model_path(str(run))
    with pytest.raises(RunRecordError, match="outside"):
        record(savedmodel="/tmp").savedmodel_path(str(run))


@pytest.mark.reliability
def test_evaluation_refuses_a_run_json_pointing_outside(tmp_path, tiny_shards):
    from kd_histo.evaluation import evaluate

    d = make_run(tmp_path, data_dir=tiny_shards)
    write_run_record(
        d, dataclasses.replace(read_run_record(d), model=os.path.join(d, "model.keras"))
    )
    with pytest.raises(RunRecordError, match="outside the run folder"):
        evaluate.evaluate_run(evaluate.EvalConfig(d, out_dir=str(tmp_path / "out")))
    assert not os.path.exists(tmp_path / "out")


def test_evaluation_makes_the_lr_view_with_the_runs_lr_method(tmp_path, tiny_shards):
    """A bicubic student is evaluated on bicubic views (it used to get area views)."""
    import tensorflow as tf

    from kd_histo.data.pipeline import PipelineConfig, make_dataset
    from kd_histo.data.views import resize
    from kd_histo.evaluation import evaluate
    from kd_histo.models import load_model

    d = make_run(tmp_path, lr_method="bicubic", data_dir=tiny_shards)
    out = evaluate.evaluate_run(evaluate.EvalConfig(d, "test", n_boot=10))
    metrics = json.load(open(out["metrics"]))
    assert metrics["run"]["lr_method"] == "bicubic"
    with open(out["predictions"]) as f:
        got = np.array(
            [[float(r[k]) for k in r if k.startswith("prob_")] for r in csv.DictReader(f)]
        )

    model = load_model(os.path.join(d, "model.keras"))
    hr = np.concatenate(
        [
            b["hr"].numpy()
            for b in make_dataset(
                PipelineConfig(tiny_shards, batch_size=64, factor=1.0, hr_px=32),
                "test",
                training=False,
            )
        ]
    )

    def probs(method):
        return tf.nn.softmax(
            model(resize(tf.constant(hr), 16, method), training=False)["logits"]
        ).numpy()

    np.testing.assert_allclose(got, probs("bicubic"), atol=2e-6)
    assert np.abs(got - probs("area")).max() > 1e-4  # the two views give this net different outputs


def test_predict_on_tiles_uses_the_runs_lr_method_and_mpp(tmp_path):
    import tensorflow as tf
    from PIL import Image

    from kd_histo.data import synthetic
    from kd_histo.data.views import resize
    from kd_histo.evaluation import predict
    from kd_histo.models import load_model

    d = make_run(tmp_path, lr_method="bicubic", mpp=None)
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    images, _, _ = synthetic.generate(2, 32, seed=3)
    for i, im in enumerate(images):
        Image.fromarray(im).save(tiles / f"t{i}.png")
    out = predict.predict(predict.PredictConfig(d, (str(tiles),), out_dir=str(tmp_path / "pred")))
    with open(out["predictions"]) as f:
        got = np.array(
            [[float(r[k]) for k in r if k.startswith("prob_")] for r in csv.DictReader(f)]
        )
    x = tf.constant(images.astype(np.float32) / 255.0)
    model = load_model(os.path.join(d, "model.keras"))
    want = tf.nn.softmax(model(resize(x, 16, "bicubic"), training=False)["logits"]).numpy()
    np.testing.assert_allclose(got, want, atol=2e-6)

    run = read_run_record(d)  # no µm/px known: slides need --read_mpp, which overrides
    with pytest.raises(ValueError, match="--read_mpp"):
        predict.tile_mpp(run, 0.0)
    assert predict.tile_mpp(run, 1.0) == 1.0
    assert predict.tile_mpp(dataclasses.replace(run, mpp=0.25), 0.0) == 0.25


def test_teacher_misfit_is_one_check_with_one_tolerance_for_training_and_the_cascade():
    from kd_histo.evaluation import cascade

    teacher = record(mode="teacher", view="hr", factor=1.0, input_px=32)
    fits = dict(class_names=NAMES, hr_px=32, mpp=0.5)
    assert rr.teacher_misfit(teacher, **fits) == ""
    assert rr.teacher_misfit(teacher, **{**fits, "mpp": None}) == ""  # unknown: nothing to compare
    assert rr.teacher_misfit(record(), **fits) == "view"
    assert rr.teacher_misfit(teacher, **{**fits, "class_names": NAMES[::-1]}) == "classes"
    assert rr.teacher_misfit(teacher, **{**fits, "hr_px": 64}) == "hr_px"
    near = 0.5 * (1 + rr.MPP_REL_TOL / 2)  # within the tolerance: one resolution
    far = 0.5 * (1 + rr.MPP_REL_TOL * 2)
    assert rr.teacher_misfit(teacher, **{**fits, "mpp": near}) == ""
    assert rr.teacher_misfit(teacher, **{**fits, "mpp": far}) == "mpp"
    cascade.check_pair(record(mpp=near), teacher)  # the cascade accepts what training accepts
    with pytest.raises(ValueError, match="µm/px"):
        cascade.check_pair(record(mpp=far), teacher)


def test_record_of_model_is_the_folders_record_only_for_its_own_model(tmp_path):
    d = make_run(tmp_path)
    assert rr.record_of_model(d) == read_run_record(d)
    assert rr.model_file(d) == os.path.join(d, rr.MODEL_FILE)
    assert rr.record_of_model(os.path.join(d, rr.MODEL_FILE)) == read_run_record(d)
    other = os.path.join(d, "checkpoint.keras")
    open(other, "wb").close()
    assert rr.record_of_model(other) is None  # not the network run.json describes
    assert rr.record_of_model(str(tmp_path / "bare.keras")) is None  # no run.json beside it
