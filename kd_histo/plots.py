"""Figures of evaluation and prediction, drawn with matplotlib's Agg backend (no display needed).

Confusion matrix, one-vs-rest ROC curves, and a probability heatmap over a slide thumbnail.
Not here: computing the numbers (``kd_histo.metrics``) or reading slides (``kd_histo.predict``).
"""

from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: binaries run headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kd_histo import metrics  # noqa: E402


def confusion_matrix_png(cm: np.ndarray, class_names: Sequence[str], path: str, title: str = "") -> str:
    """Row-normalised confusion matrix with counts in the cells; returns ``path``."""
    cm = np.asarray(cm)
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2, 1.2 * n + 1.5))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def roc_png(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: str, title: str = "") -> str:
    """One-vs-rest ROC curve per class (classes absent from ``y_true`` are left out); returns ``path``."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for c, name in enumerate(class_names):
        pos = np.asarray(y_true) == c
        if pos.all() or not pos.any():
            continue
        fpr, tpr = metrics.roc_curve(pos, probs[:, c])
        ax.plot(fpr, tpr, label=f"{name} (AUC {metrics.roc_auc_binary(pos, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or "ROC (one vs rest)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def heatmap_png(thumbnail: np.ndarray, grid: np.ndarray, path: str, title: str = "", alpha: float = 0.45) -> str:
    """A [gh, gw] map (NaN = no tile) stretched over an RGB thumbnail; returns ``path``."""
    fig, ax = plt.subplots(figsize=(8, 8 * thumbnail.shape[0] / max(thumbnail.shape[1], 1) + 0.5))
    ax.imshow(thumbnail)
    masked = np.ma.masked_invalid(grid)
    im = ax.imshow(masked, cmap="magma", alpha=alpha, vmin=0, vmax=1, interpolation="nearest",
                   extent=(0, thumbnail.shape[1], thumbnail.shape[0], 0))
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_axis_off()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
