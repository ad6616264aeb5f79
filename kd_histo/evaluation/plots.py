"""Figures of evaluation and prediction, drawn with matplotlib's Agg backend (no display needed).

Confusion matrices (one model, or several side by side), one-vs-rest ROC curves, and the
experiment figures: accuracy vs GFLOPs per image and
accuracy vs the fraction of extra unlabeled data; the cascade's accuracy vs effective GFLOPs.
Not here: computing the numbers (``kd_histo.evaluation.metrics``), a slide's heatmaps
(``kd_histo.evaluation.heatmap``).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: binaries run headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kd_histo.evaluation import metrics  # noqa: E402


def _save(fig, path: str, dpi: int = 100) -> str:
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
    return _save(fig, path)


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
    return _save(fig, path)


_KIND_STYLE = {
    "teacher": ("*", "tab:red", 14),
    "baseline": ("s", "tab:grey", 8),
    "student": ("o", "tab:blue", 8),
    "student_ce": ("D", "tab:green", 7),
}


_Y_SEEDS = "accuracy (mean ± sd over seeds; dots: seeds)"


def _seed_dots(ax, seed_rows, rows, x_of) -> None:
    """Small dots for every seed of each plotted run (``x_of(row)`` = its x, or None to skip)."""
    xs = {r["run"]: x_of(r) for r in rows}
    for r in seed_rows:
        x = xs.get(r["run"])
        if x is not None:
            ax.plot(x, r["accuracy"], ".", color="black", ms=3, alpha=0.5, zorder=3)


def accuracy_vs_gflops_png(
    rows: Sequence[dict], path: str, title: str = "", seed_rows: Sequence[dict] | None = None
) -> str:
    """Accuracy (with its 95% interval) against GFLOPs per image, one point per model.

    ``rows`` are result rows (``kd_histo.protocol.report.result_rows``) with ``run``, ``kind``,
    ``gflops``,
    ``accuracy``, ``accuracy_low``, ``accuracy_high``, ``unlabeled_fraction``; students with
    extra unlabeled data are drawn hollow. Nets of one input size share their GFLOPs, so each kind
    is nudged sideways a little (a few percent on the log axis) to keep the points apart.
    With ``seed_rows`` (the single seeds' rows), ``rows`` are the seeds' means with low/high =
    mean ∓ sd, and each seed is drawn as a small dot. Returns ``path``.
    """
    fig, ax = plt.subplots(figsize=(8, 5.5))
    placed: dict[str, float] = {}
    for kind, (marker, colour, size) in _KIND_STYLE.items():
        pts = sorted(
            (r for r in rows if r["kind"] == kind and r.get("gflops")), key=lambda r: r["gflops"]
        )
        for extra in (False, True):
            sel = [r for r in pts if (r.get("unlabeled_fraction", 0) > 0) == extra]
            if not sel:
                continue
            nudge = {
                "baseline": 0.94,
                "student": 1.0 if not extra else 1.06,
                "student_ce": 1.12,
            }.get(kind, 1.0)
            x = np.array([r["gflops"] * nudge for r in sel])
            y = np.array([r["accuracy"] for r in sel])
            lo = np.array([r.get("accuracy_low", r["accuracy"]) for r in sel])
            hi = np.array([r.get("accuracy_high", r["accuracy"]) for r in sel])
            label = {"student_ce": "student + labels"}.get(kind, kind) + (
                " + unlabeled" if extra else ""
            )
            ax.errorbar(
                x,
                y,
                yerr=[y - lo, hi - y],
                fmt=marker,
                ms=size,
                color=colour,
                capsize=3,
                label=label,
                mfc="white" if extra else colour,
                ls="-" if kind != "teacher" and not extra else "none",
                lw=1,
                alpha=0.9,
            )
            for r, xi in zip(sel, x):
                placed[r["run"]] = xi
                ax.annotate(
                    r["run"],
                    (xi, r["accuracy"]),
                    textcoords="offset points",
                    xytext=(-5, 5) if kind == "baseline" else (5, 5),
                    ha="right" if kind == "baseline" else "left",
                    fontsize=7,
                )
    if seed_rows:
        _seed_dots(ax, seed_rows, rows, lambda r: placed.get(r["run"]))
    ax.set_xscale("log")
    ax.set(
        xlabel="GFLOPs per image (log scale)",
        ylabel=_Y_SEEDS if seed_rows else "accuracy (95% CI)",
        title=title or "accuracy vs compute",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path, dpi=110)


def accuracy_vs_unlabeled_png(
    rows: Sequence[dict], path: str, title: str = "", seed_rows: Sequence[dict] | None = None
) -> str:
    """Student accuracy against the fraction of extra unlabeled data, one line per factor.

    The baseline of each factor (LR + labels) is a dashed line of the same colour, the teacher a
    dotted black line. With ``seed_rows``, ``rows`` are the seeds' means (bars ± sd) and each
    seed's student is a small dot. Returns ``path``.
    """
    fig, ax = plt.subplots(figsize=(7, 5))
    factors = sorted({r["factor"] for r in rows if r["kind"] == "student"})
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.85, max(1, len(factors))))
    for factor, colour in zip(factors, colours):
        pts = sorted(
            (r for r in rows if r["kind"] == "student" and r["factor"] == factor),
            key=lambda r: r["unlabeled_fraction"],
        )
        x = np.array([100 * r["unlabeled_fraction"] for r in pts])
        y = np.array([r["accuracy"] for r in pts])
        lo = np.array([r.get("accuracy_low", r["accuracy"]) for r in pts])
        hi = np.array([r.get("accuracy_high", r["accuracy"]) for r in pts])
        ax.errorbar(
            x,
            y,
            yerr=[y - lo, hi - y],
            fmt="o-",
            color=colour,
            capsize=3,
            label=f"student x{factor:g}",
        )
        for b in (r for r in rows if r["kind"] == "baseline" and r["factor"] == factor):
            ax.axhline(b["accuracy"], color=colour, ls="--", lw=1, label=f"baseline x{factor:g}")
    for t in (r for r in rows if r["kind"] == "teacher"):
        ax.axhline(t["accuracy"], color="black", ls=":", lw=1.2, label="teacher (HR)")
    if seed_rows:
        _seed_dots(
            ax,
            seed_rows,
            rows,
            lambda r: 100 * r["unlabeled_fraction"] if r["kind"] == "student" else None,
        )
    ax.set(
        xlabel="extra unlabeled data (% of the unlabeled pool)",
        ylabel=_Y_SEEDS if seed_rows else "accuracy (95% CI)",
        title=title or "label-free distillation: more unlabeled data",
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path, dpi=110)


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
    return _save(fig, path)


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
    return _save(fig, path, dpi=110)
