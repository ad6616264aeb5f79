"""Evaluation: slide aggregation by hand, files written, run comparison table."""

import csv
import json
import os

import numpy as np
import pytest

from kd_histo.evaluation import compare_table, evaluate

NAMES = ["a", "b"]


def _preds():
    # slide s1 (label a): tiles 0.9, 0.4, 0.45 on class a -> mean 0.583 -> a; majority: 1 a vs 2 b
    # -> b
    # slide s2 (label b): tiles 0.2, 0.3 on class a -> b by mean and by majority
    pa = np.array([0.9, 0.4, 0.45, 0.2, 0.3])
    probs = np.stack([pa, 1 - pa], 1)
    return evaluate.Predictions(
        probs=probs,
        labels=np.array([0, 0, 0, 1, 1]),
        slide_ids=np.array(["s1", "s1", "s1", "s2", "s2"]),
        sources=np.array([f"t{i}" for i in range(5)]),
        x=np.arange(5),
        y=np.zeros(5, int),
    )


def test_slide_level_mean_and_majority_by_hand():
    s = evaluate.slide_level(_preds(), 2)
    assert list(s["slide_ids"]) == ["s1", "s2"]
    np.testing.assert_allclose(
        s["mean_probs"][0], [(0.9 + 0.4 + 0.45) / 3, 1 - (0.9 + 0.4 + 0.45) / 3]
    )
    np.testing.assert_allclose(s["vote_probs"][0], [1 / 3, 2 / 3])
    np.testing.assert_array_equal(s["labels"], [0, 1])


def test_evaluate_predictions_levels_differ_as_expected():
    r = evaluate.evaluate_predictions(_preds(), NAMES, n_boot=50)
    assert r["tile"]["accuracy"] == pytest.approx(3 / 5)  # tiles 0, 3, 4 right
    assert r["slide_mean"]["accuracy"] == pytest.approx(1.0)
    assert r["slide_majority"]["accuracy"] == pytest.approx(0.5)
    assert (
        r["tile"]["ci95"]["accuracy"]["low"]
        <= r["tile"]["accuracy"]
        <= r["tile"]["ci95"]["accuracy"]["high"]
    )


def test_unlabeled_tiles_are_skipped_and_all_unlabeled_is_an_error():
    p = _preds()
    p2 = evaluate.Predictions(p.probs, np.array([0, 0, 0, 1, -1]), p.slide_ids, p.sources, p.x, p.y)
    r = evaluate.evaluate_predictions(p2, NAMES, n_boot=10)
    assert r["n_unlabeled_skipped"] == 1 and r["tile"]["n"] == 4
    p3 = evaluate.Predictions(p.probs, -np.ones(5, int), p.slide_ids, p.sources, p.x, p.y)
    with pytest.raises(ValueError, match="no labeled tiles"):
        evaluate.evaluate_predictions(p3, NAMES)


def test_write_evaluation_files_and_compare(tmp_path):
    p = _preds()
    dirs = []
    for run in ("teacher", "student_x4"):
        r = evaluate.evaluate_predictions(p, NAMES, n_boot=20)
        paths = evaluate.write_evaluation(r, p, str(tmp_path / run / "eval_test"), title=run)
        assert all(os.path.getsize(v) > 0 for v in paths.values())
        dirs.append(str(tmp_path / run / "eval_test"))
    rows = list(csv.DictReader(open(tmp_path / "teacher" / "eval_test" / "predictions.csv")))
    assert (
        len(rows) == 5
        and rows[1]["pred_name"] == "b"
        and float(rows[0]["prob_a"]) == pytest.approx(0.9)
    )
    assert json.load(open(tmp_path / "teacher" / "eval_test" / "metrics.json"))["tile"]["n"] == 5
    out = compare_table.compare_runs(dirs, str(tmp_path / "cmp" / "table"))
    table = list(csv.DictReader(open(out["csv"])))
    assert [t["run"] for t in table] == [
        "teacher",
        "student_x4",
    ]  # named after the run, not eval_test
    assert float(table[0]["tile_accuracy"]) == pytest.approx(0.6)
    md = open(out["markdown"]).read().splitlines()
    assert len(md) == 4 and md[2].startswith("| teacher | 5 | 0.600 [")


def test_compare_missing_metrics_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="run kd-histo-evaluate"):
        compare_table.compare_runs([str(tmp_path)], str(tmp_path / "t"))
