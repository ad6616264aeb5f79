"""Metrics against hand-computed references and invariants."""

import numpy as np
import pytest

from kd_histo.evaluation import metrics  # 3 classes, 6 tiles. y_pred = [0, 1, 1, 2, 2, 0].

Y = np.array([0, 0, 1, 1, 2, 2])
P = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.3, 0.5],
        [0.1, 0.1, 0.8],
        [0.5, 0.2, 0.3],
    ]
)


def test_confusion_matrix_by_hand():
    cm = metrics.confusion_matrix(Y, P.argmax(1), 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 1], [1, 0, 1]])


def test_precision_recall_f1_by_hand():
    prf = metrics.per_class_prf(metrics.confusion_matrix(Y, P.argmax(1), 3))
    # every class: 1 TP, 1 FP, 1 FN -> P = R = F1 = 1/2
    np.testing.assert_allclose(prf["precision"], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(prf["recall"], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(prf["f1"], [0.5, 0.5, 0.5])


def test_balanced_accuracy_differs_from_accuracy_on_imbalance():
    y = np.array([0, 0, 0, 0, 1])
    pred = np.array([0, 0, 0, 0, 0])
    assert metrics.accuracy(y, pred) == pytest.approx(0.8)
    assert metrics.balanced_accuracy(y, pred, 2) == pytest.approx(0.5)  # (1 + 0) / 2
    # F1 class 0: P=4/5, R=1 -> 8/9; class 1: 0 -> macro 4/9
    assert metrics.macro_f1(y, pred, 2) == pytest.approx(4 / 9)


def test_auc_by_hand_with_ties():
    # positives score 0.9, 0.5; negatives 0.5, 0.1: pairs (0.9>0.5, 0.9>0.1, 0.5=0.5 -> 1/2,
    # 0.5>0.1)
    auc = metrics.roc_auc_binary([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1])
    assert auc == pytest.approx(3.5 / 4)


def test_auc_matches_pairwise_definition_on_random_data():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 50).astype(bool)
    s = rng.integers(0, 10, 50) / 10.0  # many ties
    pos, neg = s[y], s[~y]
    ref = np.mean((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None]))
    assert metrics.roc_auc_binary(y, s) == pytest.approx(ref)


def test_auc_is_area_under_roc_curve():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 40)
    s = rng.random(40)
    fpr, tpr = metrics.roc_curve(y, s)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == pytest.approx(1) and tpr[-1] == pytest.approx(1)
    assert np.trapz(tpr, fpr) == pytest.approx(metrics.roc_auc_binary(y, s))


def test_auc_undefined_with_one_class():
    assert np.isnan(metrics.roc_auc_binary([1, 1], [0.2, 0.3]))


def test_report_per_class_auc_by_hand():
    rep = metrics.classification_report(Y, P, ["a", "b", "c"])
    # class a: positives 0.7, 0.3; negatives 0.1, 0.2, 0.1, 0.5 -> 0.7 beats 4, 0.3 beats 3: 7 of 8
    assert rep["per_class"]["a"]["auc"] == pytest.approx(7 / 8)
    assert rep["accuracy"] == pytest.approx(0.5)
    assert rep["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]


def test_report_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="probs must be"):
        metrics.classification_report(Y, P[:, :2], ["a", "b", "c"])


def test_bootstrap_perfect_predictions_give_degenerate_interval():
    y = np.array([0, 1, 0, 1])
    p = np.eye(2)[y]
    ci = metrics.bootstrap_ci(y, p, n_boot=50)
    assert ci["accuracy"]["low"] == ci["accuracy"]["high"] == 1.0


def test_bootstrap_resamples_slides_not_tiles():
    # slide A: 9 correct tiles; slide B: 1 wrong tile. Resampling slides gives accuracy only in
    # {0, 0.9, 1, ...} mixtures of whole slides; the lower bound is driven by drawing B twice.
    y = np.zeros(10, int)
    p = np.tile([0.9, 0.1], (10, 1))
    p[9] = [0.1, 0.9]
    groups = np.array(["A"] * 9 + ["B"])
    ci = metrics.bootstrap_ci(y, p, groups, n_boot=400, seed=0)
    tiles = metrics.bootstrap_ci(y, p, None, n_boot=400, seed=0)
    assert ci["accuracy"]["low"] == pytest.approx(0.0)  # (B, B) happens in ~25% of draws
    assert tiles["accuracy"]["low"] > 0.6  # tile resampling cannot produce an all-wrong sample
    assert ci["accuracy"]["low"] <= ci["accuracy"]["high"]
