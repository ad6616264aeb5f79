"""The cascade: which tiles the teacher re-scores, the merged outputs, the cost accounting, the
teacher/student contract, and the cascade in evaluation and prediction."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
from support import SYNTHETIC_NAMES, run_record

from kd_histo.evaluation import cascade
from kd_histo.training.run_record import RunRecord, write_run_record

NAMES = SYNTHETIC_NAMES


def random_probs(n, c=4, seed=0):
    x = np.random.default_rng(seed).gamma(1.0, size=(n, c))
    return x / x.sum(1, keepdims=True)


@pytest.mark.parametrize("n", [0, 1, 7, 10, 100, 101, 997])
@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.1, 0.15, 0.29, 0.5, 1.0])
def test_fraction_is_honoured_exactly_and_takes_the_least_confident(n, fraction):
    probs = random_probs(n, seed=n)
    mask = cascade.select(probs, fraction=fraction)
    k = int(mask.sum())
    assert k == math.floor(round(fraction * n, 9))  # 0.29 * 100 = 28.999999999999996 is 29 tiles
    assert k <= fraction * n + 1e-9  # never more than the fraction
    conf = probs.max(1) if n else np.zeros(0)
    if 0 < k < n:
        assert conf[mask].max() <= conf[~mask].min()


def test_ties_go_to_the_earlier_tile():
    probs = np.full((10, 4), 0.25)  # every tile equally unsure
    assert np.flatnonzero(cascade.select(probs, fraction=0.3)).tolist() == [0, 1, 2]
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.6, 0.4], [0.6, 0.4], [0.55, 0.45]])
    assert np.flatnonzero(cascade.select(probs, fraction=0.6)).tolist() == [1, 2, 4]


def test_threshold_selects_tiles_under_it():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    assert np.flatnonzero(cascade.select(probs, threshold=0.7)).tolist() == [1, 3]
    assert not cascade.select(probs, threshold=0.5).any()
    for kwargs in ({}, {"fraction": 0.1, "threshold": 0.5}, {"fraction": 1.5}, {"threshold": 0.0}):
        with pytest.raises(ValueError):
            cascade.select(probs, **kwargs)


def test_fraction_zero_is_the_student_and_one_is_the_teacher():
    student, teacher = random_probs(50, seed=1), random_probs(50, seed=2)
    for f, want in ((0.0, student), (1.0, teacher)):
        mask = cascade.select(student, fraction=f)
        np.testing.assert_array_equal(cascade.combine(student, teacher[mask], mask), want)
    mask = cascade.select(student, fraction=0.2)
    mixed = cascade.combine(student, teacher[mask], mask)
    np.testing.assert_array_equal(mixed[mask], teacher[mask])
    np.testing.assert_array_equal(mixed[~mask], student[~mask])
    with pytest.raises(ValueError, match="teacher outputs"):
        cascade.combine(student, teacher[:3], mask)


def test_effective_cost_is_student_plus_share_of_teacher():
    assert cascade.effective_gflops(0.05, 3.2, 0.0) == pytest.approx(0.05)
    assert cascade.effective_gflops(0.05, 3.2, 0.1) == pytest.approx(0.05 + 0.32)
    assert cascade.effective_gflops(0.05, 3.2, 1.0) == pytest.approx(3.25)
    with pytest.raises(ValueError):
        cascade.effective_gflops(0.05, 3.2, 1.2)


def test_measure_curve_accounts_cost_and_accuracy():
    rng = np.random.default_rng(0)
    n, c = 40, 4
    labels = rng.integers(0, c, n)
    labels[:3] = -1  # unlabeled tiles are scored but not counted
    student_out = random_probs(n, c, seed=5)
    teacher_out = np.eye(c)[np.maximum(labels, 0)] * 0.9 + 0.025  # a teacher that is always right
    calls = []

    def student_fn(x):
        return student_out[x[:, 0].astype(int)]

    def teacher_fn(x):
        calls.append(len(x))
        return teacher_out[x[:, 0].astype(int)]

    idx = np.arange(n, dtype=float)[:, None]
    rows = cascade.measure_curve(
        student_fn,
        teacher_fn,
        idx,
        idx,
        labels,
        student_gflops=0.1,
        teacher_gflops=2.0,
        fractions=(0.0, 0.1, 0.5, 1.0),
        batch_size=8,
        repeats=2,
    )
    assert [r["scored_by"] for r in rows] == ["cascade"] * 4 + ["teacher"]
    assert [r["n_teacher"] for r in rows] == [0, 4, 20, 40, 40]
    for r in rows[:4]:
        assert r["gflops_per_tile"] == pytest.approx(0.1 + r["n_teacher"] / n * 2.0)
        mask = cascade.select(student_out, fraction=r["fraction"])
        want = cascade.accuracy(np.where(mask[:, None], teacher_out, student_out), labels)
        assert r["accuracy"] == pytest.approx(want)
        assert r["tiles_per_s"] == pytest.approx(n / r["seconds"])
    keep = labels >= 0
    assert rows[0]["accuracy"] == pytest.approx(
        (student_out[keep].argmax(1) == labels[keep]).mean()
    )
    assert rows[3]["accuracy"] == rows[4]["accuracy"] == 1.0
    assert rows[4]["gflops_per_tile"] == 2.0 and rows[4]["speedup_vs_teacher"] == pytest.approx(1.0)
    # the teacher ran on the selected tiles only: one untimed warm-up batch, then 2 timed passes
    assert sum(calls) == (8 + 2 * 40) + (4 + 2 * 4) + (8 + 2 * 20) + (8 + 2 * 40)


def test_cheapest_share_within_a_point_of_the_teacher():
    rows = [
        {"scored_by": "cascade", "teacher_share": f, "accuracy": a}
        for f, a in ((0.0, 0.90), (0.1, 0.935), (0.2, 0.945), (0.5, 0.95))
    ]
    teacher = {"scored_by": "teacher", "teacher_share": 1.0, "accuracy": 0.95}
    assert cascade.cheapest_within(rows + [teacher], points=1.0)["teacher_share"] == 0.2
    assert cascade.cheapest_within(rows + [teacher], points=2.0)["teacher_share"] == 0.1
    assert cascade.cheapest_within(rows[:2] + [teacher], points=1.0) is None


def rec(**changes) -> RunRecord:
    return run_record(**changes)


TEACHER = dict(mode="teacher", view="hr", factor=1.0, input_px=32)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"class_names": ("tumour", "lymphocytes", "stroma", "debris")}, "order"),
        ({"mode": "baseline", "view": "lr", "factor": 2.0, "input_px": 16}, "HR tiles"),
        ({"hr_px": 64, "input_px": 64}, "px HR tiles"),
        ({"mpp": 1.0}, "µm/px"),
    ],
)
def test_a_teacher_that_does_not_fit_the_student_is_refused(changes, words):
    cascade.check_pair(rec(), rec(**TEACHER))  # the student's own teacher fits
    cascade.check_pair(rec(mpp=None), rec(**TEACHER))  # unknown µm/px: nothing to compare
    with pytest.raises(ValueError, match=words):
        cascade.check_pair(rec(), rec(**{**TEACHER, **changes}))


def make_run(root, name, **changes) -> str:
    from kd_histo.models import build_model

    r = rec(**changes)
    d = os.path.join(str(root), name)
    os.makedirs(d)
    net = build_model(
        "resnet_gn",
        len(r.class_names),
        mean=r.mean,
        std=r.std,
        planes=(4, 8, 8, 16),
        stem="small",
        name=name,
    )
    net.save(os.path.join(d, "model.keras"))
    write_run_record(d, r)
    return d


def _probs_csv(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return rows, np.array([[float(r[k]) for k in r if k.startswith("prob_")] for r in rows])


def test_evaluate_with_cascade_writes_the_curve_whose_ends_are_student_and_teacher(
    tmp_path, tiny_shards
):
    from kd_histo.evaluation import evaluate

    student = make_run(tmp_path, "student", data_dir=tiny_shards)
    teacher = make_run(tmp_path, "teacher", data_dir=tiny_shards, **TEACHER)
    out = evaluate.evaluate_run(
        evaluate.EvalConfig(
            student, n_boot=10, cascade_teacher=teacher, cascade_fractions=(0.0, 0.25, 0.5)
        )
    )
    t_out = evaluate.evaluate_run(evaluate.EvalConfig(teacher, n_boot=10))
    data = json.load(open(out["cascade_json"]))
    rows = data["rows"]
    assert [r["fraction"] for r in rows] == [0.0, 0.25, 0.5, 1.0] and rows[-1][
        "scored_by"
    ] == "teacher"
    n = json.load(open(out["metrics"]))["tile"]["n"]
    assert [r["n_teacher"] for r in rows] == [0, n // 4, n // 2, n]
    assert rows[0]["accuracy"] == pytest.approx(json.load(open(out["metrics"]))["tile"]["accuracy"])
    assert rows[-1]["accuracy"] == pytest.approx(
        json.load(open(t_out["metrics"]))["tile"]["accuracy"]
    )
    assert rows[-1]["gflops_per_tile"] > 3 * rows[0]["gflops_per_tile"]  # 4x the pixels
    assert all(r["tiles_per_s"] > 0 for r in rows)
    with open(out["cascade_csv"]) as f:
        assert len(list(csv.DictReader(f))) == 4
    assert os.path.getsize(out["cascade_png"]) > 0

    wrong = make_run(
        tmp_path, "wrong_order", data_dir=tiny_shards, **{**TEACHER, "class_names": NAMES[::-1]}
    )
    with pytest.raises(ValueError, match="order"):
        evaluate.evaluate_run(
            evaluate.EvalConfig(student, cascade_teacher=wrong, out_dir=str(tmp_path / "no"))
        )
    assert not os.path.exists(tmp_path / "no")  # refused before anything was written


def test_predict_with_cascade_rescores_the_least_confident_tiles_with_the_teacher(tmp_path):
    import tensorflow as tf
    from PIL import Image

    from kd_histo.data import synthetic
    from kd_histo.evaluation import predict
    from kd_histo.models import load_model

    student = make_run(tmp_path, "student")
    teacher = make_run(tmp_path, "teacher", **TEACHER)
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    images, _, _ = synthetic.generate(2, 32, seed=4)  # 8 tiles, one group
    for i, im in enumerate(images):
        Image.fromarray(im).save(tiles / f"t{i}.png")
    alone = predict.predict(
        predict.PredictConfig(student, (str(tiles),), out_dir=str(tmp_path / "alone"))
    )
    out = predict.predict(
        predict.PredictConfig(
            student,
            (str(tiles),),
            out_dir=str(tmp_path / "cascade"),
            cascade_teacher=teacher,
            cascade_fraction=0.25,
        )
    )
    _, p_student = _probs_csv(alone["predictions"])
    rows, p = _probs_csv(out["predictions"])
    by = np.array([r["scored_by"] == "teacher" for r in rows])
    np.testing.assert_array_equal(
        by, cascade.select(p_student, fraction=0.25)
    )  # 2 least confident of 8
    x = tf.constant(images.astype(np.float32) / 255.0)
    p_teacher = tf.nn.softmax(load_model(os.path.join(teacher, "model.keras"))(x)["logits"]).numpy()
    np.testing.assert_allclose(p[by], p_teacher[by], atol=2e-6)
    np.testing.assert_allclose(p[~by], p_student[~by], atol=2e-6)
    with pytest.raises(ValueError, match="cascade_fraction"):
        predict.PredictConfig(student, (str(tiles),), cascade_teacher=teacher)
