"""Classification metrics in pure NumPy: tile- or slide-level, with bootstrap confidence intervals.

Inputs are integer labels ``y_true`` [N] and class probabilities ``probs`` [N, C] (rows sum to 1).
Metrics: accuracy, balanced accuracy, macro F1, per-class precision/recall/F1, one-vs-rest ROC AUC
per class and macro, confusion matrix, and percentile-bootstrap 95% intervals that resample whole
slides when slide ids are given (tiles of one slide are not independent).

Not here: aggregation of tiles into slides and file output (``kd_histo.evaluation.evaluate``), plots
(``kd_histo.evaluation.plots``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [C, C]: row = true class, column = predicted class."""
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def per_class_prf(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support from a confusion matrix (0 where undefined)."""
    tp = np.diag(cm).astype(float)
    precision = _safe_div(tp, cm.sum(0))
    recall = _safe_div(tp, cm.sum(1))
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": cm.sum(1)}


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of correct predictions."""
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in ``y_true``."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    present = cm.sum(1) > 0
    return float(per_class_prf(cm)["recall"][present].mean())


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean F1 over the classes present in ``y_true`` or in ``y_pred``."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    present = (cm.sum(1) + cm.sum(0)) > 0
    return float(per_class_prf(cm)["f1"][present].mean())


def roc_auc_binary(is_pos: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve by the rank statistic (ties count 1/2); NaN with one class only."""
    is_pos = np.asarray(is_pos, bool)
    score = np.asarray(score, float)
    n_pos, n_neg = int(is_pos.sum()), int((~is_pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(score)
    return float((ranks[is_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their mean rank (what Mann-Whitney U needs)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), float)
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0
            start = end
    return ranks


def roc_curve(is_pos: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    is_pos = np.asarray(is_pos, bool)
    order = np.argsort(-np.asarray(score, float), kind="mergesort")
    s, p = np.asarray(score, float)[order], is_pos[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each threshold group
    tps, fps = np.cumsum(p)[last], np.cumsum(~p)[last]
    # a curve with no positives (or negatives) stays at 0 on that axis instead of dividing by 0
    tpr = np.r_[0.0, _safe_div(tps, np.full(len(tps), p.sum()))]
    fpr = np.r_[0.0, _safe_div(fps, np.full(len(fps), (~p).sum()))]
    return fpr, tpr


def roc_auc_ovr(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, float]:
    """One-vs-rest AUC per class and their mean over classes where it is defined."""
    y_true, probs = np.asarray(y_true, int), np.asarray(probs, float)
    per = np.array([roc_auc_binary(y_true == c, probs[:, c]) for c in range(probs.shape[1])])
    macro = float(np.nanmean(per)) if np.isfinite(per).any() else float("nan")
    return per, macro


def classification_report(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> dict:
    """All metrics of the module for one set of predictions (argmax of ``probs``).

    Returns:
      A JSON-ready dict: accuracy, balanced_accuracy, macro_f1, macro_auc, n, confusion_matrix,
      and per_class {name: precision, recall, f1, support, auc}.
    """
    y_true, probs = np.asarray(y_true, int), np.asarray(probs, float)
    c = len(class_names)
    if probs.ndim != 2 or probs.shape != (len(y_true), c):
        raise ValueError(f"probs must be [N={len(y_true)}, C={c}], got {probs.shape}")
    y_pred = probs.argmax(1)
    cm = confusion_matrix(y_true, y_pred, c)
    prf = per_class_prf(cm)
    auc, macro_auc = roc_auc_ovr(y_true, probs)
    return {
        "n": int(len(y_true)),
        "accuracy": accuracy(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy(y_true, y_pred, c),
        "macro_f1": macro_f1(y_true, y_pred, c),
        "macro_auc": _json_float(macro_auc),
        "confusion_matrix": cm.tolist(),
        "per_class": {
            name: {
                "precision": float(prf["precision"][i]),
                "recall": float(prf["recall"][i]),
                "f1": float(prf["f1"][i]),
                "support": int(prf["support"][i]),
                "auc": _json_float(auc[i]),
            }
            for i, name in enumerate(class_names)
        },
    }


def _json_float(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


SCALAR_METRICS: dict[str, Callable[[np.ndarray, np.ndarray, int], float]] = {
    "accuracy": lambda y, p, c: accuracy(y, p.argmax(1)),
    "balanced_accuracy": lambda y, p, c: balanced_accuracy(y, p.argmax(1), c),
    "macro_f1": lambda y, p, c: macro_f1(y, p.argmax(1), c),
    "macro_auc": lambda y, p, c: roc_auc_ovr(y, p)[1],
}


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, dict[str, float | None]]:
    """Percentile bootstrap intervals of the scalar metrics.

    Args:
      y_true: labels [N].
      probs: probabilities [N, C].
      groups: slide id per row; when given, whole slides are resampled (with replacement) so the
        interval reflects slide-to-slide variation; None resamples rows.
      n_boot: bootstrap replicates.
      alpha: 0.05 gives a 95% interval.
      seed: random seed (the intervals are reproducible).

    Returns:
      {metric: {"low", "high", "level"}}; None bounds where a metric is undefined in every
      replicate.
    """
    y_true, probs = np.asarray(y_true, int), np.asarray(probs, float)
    c = probs.shape[1]
    if groups is None:
        members = [np.array([i]) for i in range(len(y_true))]
    else:
        groups = np.asarray(groups)
        members = [np.nonzero(groups == g)[0] for g in np.unique(groups)]
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in SCALAR_METRICS}
    for _ in range(n_boot):
        pick = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[i] for i in pick])
        for name, fn in SCALAR_METRICS.items():
            samples[name].append(fn(y_true[idx], probs[idx], c))
    out = {}
    for name, vals in samples.items():
        v = np.asarray(vals, float)
        v = v[np.isfinite(v)]
        if not len(v):
            out[name] = {"low": None, "high": None, "level": 1 - alpha}
            continue
        low, high = np.quantile(v, [alpha / 2, 1 - alpha / 2])
        out[name] = {"low": float(low), "high": float(high), "level": 1 - alpha}
    return out
