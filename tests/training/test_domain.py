"""A run's domain: the stain reference it is trained with travels in its net (evaluation applies
it without being told; a student takes its teacher's), and the out-of-domain statistics it
stores at its end flag tiles unlike its training data."""

import csv
import dataclasses
import json
import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import TINY_PLANES, tiny_run_config, write_tiny_shards

from kd_histo.data import stain_norm
from kd_histo.data.pipeline import PipelineConfig, make_dataset
from kd_histo.data.stain_norm import StainConfig
from kd_histo.evaluation import ood_report
from kd_histo.evaluation.evaluate import EvalConfig, evaluate_run
from kd_histo.models import build_model, load_model, ood, ood_features
from kd_histo.models.stain import StainNormalization, stain_reference_of
from kd_histo.training import domain, train
from kd_histo.training.config import DistillConfig, NetConfig, RunConfig
from kd_histo.training.preflight import PreflightError
from kd_histo.training.run_record import read_run_record


def _ood_features(net, images, stats) -> np.ndarray:
    """The tiles' statistics that ``stats`` scores, measured by the net (one pass)."""
    _, f = ood_features.feature_function(net, stats.layers)(np.asarray(images, np.float32))
    return np.asarray(f, np.float64)


def _cfg(data_dir, model_dir, **kw) -> RunConfig:
    return tiny_run_config(data_dir, model_dir, **{"epochs": 1, **kw})


@pytest.fixture(scope="module")
def reinhard_teacher(tiny_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("domain") / "teacher"
    train.train(_cfg(tiny_shards, run, stain=StainConfig("reinhard")))
    return str(run)


def test_the_reference_is_fitted_on_the_training_tiles_and_recorded(reinhard_teacher, tiny_shards):
    record = read_run_record(reinhard_teacher)
    ref = record.stain_reference
    assert ref is not None and ref.method == "reinhard"
    # The same fit, by hand: every training tile (fewer than REFERENCE_TILES), as stored.
    plain = PipelineConfig(tiny_shards, batch_size=64)
    tiles = [t for b in make_dataset(plain, "train", training=False) for t in b["hr"].numpy()]
    expected = stain_norm.fit_reference("reinhard", tiles, source="x")
    assert ref.num_tiles == len(tiles)
    # Its out-of-domain score also reads the tiles' colours as scanned (before the stain layer).
    assert ood.OODStats.load(reinhard_teacher).layers[:2] == (
        ("image", "mean_sd"),
        ("normalize", "mean_sd"),
    )
    np.testing.assert_allclose(ref.mean, expected.mean, atol=1e-5)
    np.testing.assert_allclose(ref.std, expected.std, atol=1e-5)


def test_evaluation_applies_the_runs_normalisation_without_being_told(
    reinhard_teacher, tiny_shards, tmp_path
):
    record = read_run_record(reinhard_teacher)
    net = load_model(record.model_path(reinhard_teacher))
    assert stain_reference_of(net) == record.stain_reference
    # The same net without the layer, fed tiles normalised by hand: the saved net's outputs.
    bare = build_model(
        "resnet_gn",
        record.num_classes,
        mean=record.mean,
        std=record.std,
        planes=TINY_PLANES,
        stem="small",
    )
    bare.set_weights(net.get_weights())
    plain = PipelineConfig(tiny_shards, batch_size=64)
    images = np.concatenate([b["hr"].numpy() for b in make_dataset(plain, "test", training=False)])
    by_hand = [stain_norm.normalise(tf.constant(im), record.stain_reference) for im in images]
    expected = keras.ops.softmax(bare(tf.stack(by_hand))["logits"]).numpy()
    # Not a no-op: without the normalisation the outputs differ.
    unnormalised = keras.ops.softmax(bare(images)["logits"]).numpy()
    assert np.abs(unnormalised - expected).max() > 1e-4
    files = evaluate_run(
        EvalConfig(model_dir=reinhard_teacher, split="test", out_dir=str(tmp_path), n_boot=10)
    )
    with open(files["predictions"]) as f:
        rows = list(csv.DictReader(f))
    got = np.array([[float(r[f"prob_{c}"]) for c in record.class_names] for r in rows])
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_a_student_takes_its_teachers_reference_and_refuses_another(
    reinhard_teacher, tiny_shards, tmp_path
):
    student = tmp_path / "student"
    cfg = _cfg(
        tiny_shards,
        student,
        mode="distill",
        data=PipelineConfig(tiny_shards, batch_size=4, factor=2.0),
        distill=DistillConfig(teacher=reinhard_teacher),
    )
    train.train(cfg)
    teacher_ref = read_run_record(reinhard_teacher).stain_reference
    assert read_run_record(str(student)).stain_reference == teacher_ref
    net = load_model(os.path.join(student, "model.keras"))
    assert any(isinstance(layer, StainNormalization) for layer in net.layers)
    other = dataclasses.replace(
        cfg, model_dir=str(tmp_path / "other"), stain=StainConfig("macenko")
    )
    with pytest.raises(PreflightError, match="takes its teacher's stain normalisation"):
        train.train(other)


def test_ood_threshold_is_calibrated_on_val_and_flags_an_unseen_kind_of_tile(tmp_path):
    # Enough tiles for Gaussians of a 64-wide embedding: 40 per class to fit, 20 to calibrate.
    data = write_tiny_shards(tmp_path / "data", per_class=40, unlabeled=0)
    run = tmp_path / "teacher"
    net = NetConfig(planes=(8, 16, 32, 64), stem="small")
    batches = PipelineConfig(data, batch_size=8)
    train.train(_cfg(data, run, data=batches, net=net, epochs=3, steps_per_epoch=10))
    stats = ood.OODStats.load(str(run))
    assert stats is not None and stats.num_fit == 4 * 40
    assert read_run_record(str(run)).ood_threshold == pytest.approx(stats.threshold)
    net = load_model(os.path.join(run, "model.keras"))
    plain = PipelineConfig(data, batch_size=64)

    def tiles(split):
        return np.concatenate([b["hr"].numpy() for b in make_dataset(plain, split, training=False)])

    def flagged(images):
        return np.mean(stats.scores(_ood_features(net, images, stats)) > stats.threshold)

    val = tiles("val")
    assert stats.num_calibration == len(val)
    assert flagged(val) <= stats.flag_fraction + 1.0 / len(val)  # by construction
    # Held-out tiles of the training classes (other slides): mostly not flagged.
    assert flagged(tiles("test")) <= 0.2
    # An unseen kind of tile: saturated green stripes, nothing like the H&E-like classes.
    rng = np.random.default_rng(0)
    stripes = (np.arange(val.shape[2]) // 3 % 2).astype(np.float32)
    green = np.zeros((32,) + val.shape[1:], np.float32)
    green[..., 1] = 0.6 + 0.4 * stripes[None, None, :]
    green += rng.uniform(0, 0.05, green.shape).astype(np.float32)
    assert flagged(green) >= 0.9
    assert stats.layers == ood_features.default_layers(net) and len(stats.terms) == 5

    # A run of before (the pooled term alone, no threshold of the new score) refitted without
    # training: the statistics training stores, measured again on the same tiles.
    import shutil

    old = tmp_path / "old"
    shutil.copytree(run, old)
    with open(old / ood.OOD_FILE, "wb") as f:
        np.savez(
            f, means=np.zeros((4, 64)), precision=np.eye(64), meta=json.dumps({"threshold": 1.0})
        )
    refit = domain.refit_ood(str(old), log=lambda line: None)
    back = ood.OODStats.load(str(old))
    assert back.layers == stats.layers and back.num_calibration == stats.num_calibration
    assert back.threshold == pytest.approx(stats.threshold, rel=1e-4) == refit.threshold
    for a, b in zip(back.terms, stats.terms):
        np.testing.assert_allclose(a.means, b.means, rtol=1e-4, atol=1e-6)
    assert read_run_record(str(old)).ood_threshold == pytest.approx(back.threshold)


def test_a_run_without_val_has_no_ood_statistics_and_says_so(tiny_shards_without, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kd_histo")
    run = tmp_path / "noval"
    train.train(_cfg(tiny_shards_without("val"), run, allow_no_val=True))
    assert ood.OODStats.load(str(run)) is None
    assert read_run_record(str(run)).ood_threshold is None
    assert "no out-of-domain statistics: no val split" in caplog.text


def test_evaluation_scores_each_tile_and_summarises_slides(reinhard_teacher, tmp_path, caplog):
    import json
    import shutil

    stats = ood.OODStats.load(reinhard_teacher)
    files = evaluate_run(
        EvalConfig(model_dir=reinhard_teacher, out_dir=str(tmp_path / "e"), n_boot=10)
    )
    with open(files["predictions"]) as f:
        rows = list(csv.DictReader(f))
    # The scores, by hand: the saved net's statistics of the same tiles, in file order.
    record = read_run_record(reinhard_teacher)
    net = load_model(record.model_path(reinhard_teacher))
    plain = PipelineConfig(record.data_dir, batch_size=64)
    images = np.concatenate([b["hr"].numpy() for b in make_dataset(plain, "test", training=False)])
    expected = stats.scores(_ood_features(net, images, stats))
    got = np.array([float(r["ood_score"]) for r in rows])
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    flags = np.array([int(r["ood_flag"]) for r in rows])
    np.testing.assert_array_equal(flags, (expected > stats.threshold).astype(int))
    summary = json.load(open(files["metrics"]))["ood"]
    assert summary["flagged_fraction"] == pytest.approx(flags.mean())
    slides = {r["slide_id"] for r in rows}
    assert set(summary["slides_flagged_fraction"]) == slides
    # A run trained before the statistics existed still evaluates, said once, without columns.
    old = tmp_path / "old"
    shutil.copytree(reinhard_teacher, old)
    os.remove(old / ood.OOD_FILE)
    caplog.clear()
    files = evaluate_run(EvalConfig(model_dir=str(old), out_dir=str(tmp_path / "o"), n_boot=10))
    assert caplog.text.count("no out-of-domain statistics") == 1
    with open(files["predictions"]) as f:
        assert "ood_score" not in next(csv.reader(f))
    assert "ood" not in json.load(open(files["metrics"]))


def test_a_slide_above_the_warn_fraction_gets_one_line():
    fractions = ood.slide_fractions(
        np.array(["a", "a", "b", "b", "b", "c"]), np.array([1, 1, 0, 1, 0, 0], bool)
    )
    assert fractions == {"a": 1.0, "b": pytest.approx(1 / 3), "c": 0.0}
    lines = ood.warning_lines(fractions, 0.3)
    assert [line.split(":")[0] for line in lines] == ["slide a", "slide b"]
    assert [line.split(":")[0] for line in ood.warning_lines(fractions, 0.5)] == ["slide a"]


def test_prediction_scores_each_tile_and_warns_per_slide(reinhard_teacher, tmp_path, caplog):
    import shutil

    from PIL import Image

    from kd_histo.evaluation import qupath_out
    from kd_histo.evaluation.predict import PredictConfig, predict

    record = read_run_record(reinhard_teacher)
    net = load_model(record.model_path(reinhard_teacher))
    # A copy of the run whose threshold flags about half of the tiles (the tiny net flags few),
    # so that some slides warn and some do not.
    run = tmp_path / "run"
    shutil.copytree(reinhard_teacher, run)
    reinhard_teacher = str(run)
    stats = ood.OODStats.load(reinhard_teacher)
    # A tile folder: the test split's tiles as PNGs, one group.
    plain = PipelineConfig(record.data_dir, batch_size=64)
    images = np.concatenate([b["hr"].numpy() for b in make_dataset(plain, "test", training=False)])
    folder = tmp_path / "tiles" / "groupA"
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(np.round(im * 255).astype(np.uint8)).save(folder / f"t{i:03d}.png")
    pngs = np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]) / 255.0
    expected = stats.scores(_ood_features(net, pngs, stats))
    stats = dataclasses.replace(stats, threshold=float(np.median(expected)))
    stats.save(reinhard_teacher)
    out = tmp_path / "pred"
    caplog.set_level(logging.WARNING, logger="kd_histo")
    predict(
        PredictConfig(
            model_dir=reinhard_teacher,
            inputs=(str(tmp_path / "tiles"), record.data_dir),
            out_dir=str(out),
            ood_warn_fraction=0.5,
        )
    )
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    folder_rows = [r for r in rows if r["source"].endswith(".png")]
    got = np.array([float(r["ood_score"]) for r in folder_rows])
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    assert [int(r["ood_flag"]) for r in folder_rows] == list((expected > stats.threshold) * 1)
    shard_rows = [r for r in rows if not r["source"].endswith(".png")]
    assert shard_rows and all(r["ood_score"] != "" for r in shard_rows)
    with open(out / "slides.csv") as f:
        slides = {r["slide_id"]: float(r["ood_flagged"]) for r in csv.DictReader(f)}
    warned = {s for s, v in slides.items() if v > 0.5}
    assert warned and len(warned) < len(slides)  # some slides warn, some do not
    for s in warned:
        assert f"slide {s}:" in caplog.text
    assert caplog.text.count("out of the model's domain") == len(warned)
    # The GeoJSON measurement of a slide's tiles.
    fc = qupath_out.tile_features(
        "s", [(0, 0), (32, 0)], 32, np.array([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"],
        ood_scores=np.array([1.5, 99.0]),
    )  # fmt: skip
    assert [f["properties"]["measurements"]["ood_score"] for f in fc["features"]] == [1.5, 99.0]


def test_flagged_by_split_agrees_with_the_evaluations_flags(reinhard_teacher, tmp_path):
    files = evaluate_run(
        EvalConfig(model_dir=reinhard_teacher, out_dir=str(tmp_path / "e"), n_boot=10)
    )
    with open(files["predictions"]) as f:
        rows = list(csv.DictReader(f))
    flags = np.array([int(r["ood_flag"]) for r in rows])
    by_group = {}
    for r, flag in zip(rows, flags):
        by_group.setdefault(r["slide_id"], []).append(flag)
    val, test = ood_report.flagged_by_split(reinhard_teacher, ("val", "test"))
    assert (test.split, test.tiles, test.groups) == ("test", len(rows), len(by_group))
    assert test.flagged == pytest.approx(flags.mean())
    assert test.groups_mostly_flagged == sum(np.mean(v) > 0.5 for v in by_group.values())
    # val is the threshold's calibration set: about FLAG_FRACTION of it, by construction.
    assert val.tiles > 0 and abs(val.flagged - ood.FLAG_FRACTION) <= 1.0 / val.tiles + 1e-9
    import shutil

    old = tmp_path / "old"
    shutil.copytree(reinhard_teacher, old)
    os.remove(old / ood.OOD_FILE)
    with pytest.raises(FileNotFoundError, match="no ood.npz"):
        ood_report.flagged_by_split(str(old), ("test",))
