"""Figures of evaluation and prediction, drawn with matplotlib's Agg backend (no display needed).

Confusion matrices (one model, or several side by side), one-vs-rest ROC curves, and the
cascade's accuracy vs effective GFLOPs.
Not here: computing the numbers (``kd_histo.evaluation.metrics``), a slide's heatmaps
(``kd_histo.evaluation.heatmap``), the experiment's figures (``kd_histo.protocol.figures``).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: binaries run headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kd_histo.evaluation import metrics  # noqa: E402


def save_png(fig, path: str, dpi: int = 100) -> str:
    """Lays ``fig`` out, writes it to ``path`` and frees it; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _confusion_cells(
    ax, cm: np.ndarray, fontsize: float | None = None, counts: bool = True
) -> None:
    """Draws a row-normalised confusion matrix into ``ax``, with the counts in the cells."""
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    if not counts:
        return
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            colour = "white" if frac[i, j] > 0.5 else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=fontsize, color=colour)


def confusion_matrix_png(
    cm: np.ndarray, class_names: Sequence[str], path: str, title: str = ""
) -> str:
    """Row-normalised confusion matrix with counts in the cells; returns ``path``."""
    cm = np.asarray(cm)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2, 1.2 * n + 1.5))
    _confusion_cells(ax, cm)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    return save_png(fig, path)


def roc_png(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: str, title: str = ""
) -> str:
    """One-vs-rest ROC curve per class (classes absent from ``y_true`` left out); returns path."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for c, name in enumerate(class_names):
        pos = np.asarray(y_true) == c
        if pos.all() or not pos.any():
            continue
        fpr, tpr = metrics.roc_curve(pos, probs[:, c])
        ax.plot(fpr, tpr, label=f"{name} (AUC {metrics.roc_auc_binary(pos, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=title or "ROC (one vs rest)",
    )
    ax.legend(loc="lower right", fontsize=8)
    return save_png(fig, path)


def confusion_grid_png(
    matrices: Sequence[tuple[str, np.ndarray]], class_names: Sequence[str], path: str
) -> str:
    """Row-normalised confusion matrices of several models side by side; returns ``path``."""
    n, k = len(matrices), len(class_names)
    if n == 0:
        raise ValueError("no confusion matrices to draw")
    cols = min(4, n)
    rows_ = (n + cols - 1) // cols
    cell = 0.45 * k + 1.6
    fig, axes = plt.subplots(rows_, cols, figsize=(cell * cols, cell * rows_ + 0.3), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_axis_off()
    for ax, (name, cm) in zip(axes.ravel(), matrices):
        cm = np.asarray(cm)
        _confusion_cells(ax, cm, fontsize=7, counts=k <= 10)  # counts stay legible up to 10 classes
        ax.set_xticks(range(k), class_names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(k), class_names, fontsize=7)
        ax.set_title(f"{name}\naccuracy {np.trace(cm) / max(1, cm.sum()):.3f}", fontsize=9)
    fig.supxlabel("predicted", fontsize=9)
    fig.supylabel("true", fontsize=9)
    return save_png(fig, path)


def cascade_png(rows: Sequence[dict], path: str, title: str = "") -> str:
    """The cascade's accuracy against its effective GFLOPs per tile, one point per teacher share,
    with the teacher alone as a reference; rows from ``kd_histo.evaluation.cascade.measure_curve``.
    Returns ``path``."""
    fig, ax = plt.subplots(figsize=(7, 5))
    pts = sorted(
        (r for r in rows if r["scored_by"] == "cascade"), key=lambda r: r["gflops_per_tile"]
    )
    ax.plot(
        [r["gflops_per_tile"] for r in pts],
        [r["accuracy"] for r in pts],
        "o-",
        color="tab:blue",
        label="student + teacher on the least confident tiles",
    )
    for i, r in enumerate(pts):  # labels alternate below/above so neighbouring points stay readable
        ax.annotate(
            f"{100 * r['teacher_share']:.0f}% ({r['speedup_vs_teacher']:.1f}x)",
            (r["gflops_per_tile"], r["accuracy"]),
            textcoords="offset points",
            xytext=(4, -13) if i % 2 == 0 else (-10, 8),
            fontsize=8,
        )
    for r in (r for r in rows if r["scored_by"] == "teacher"):
        ax.plot(
            [r["gflops_per_tile"]],
            [r["accuracy"]],
            "*",
            ms=14,
            color="tab:red",
            label="teacher alone",
        )
        ax.axhline(r["accuracy"], color="tab:red", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set(
        xlabel="effective GFLOPs per tile (log scale)",
        ylabel="tile accuracy",
        title=title or "cascade: accuracy vs cost (labels: teacher share, measured speedup)",
    )
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return save_png(fig, path, dpi=110)
