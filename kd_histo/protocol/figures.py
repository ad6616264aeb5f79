"""The experiment's figures: accuracy vs GFLOPs per image, and accuracy vs the fraction of extra
unlabeled data, drawn from result rows (``kd_histo.protocol.rows.result_rows``).

How each kind of run is drawn (marker, colour, legend label, sideways nudge) is read from its row
of ``kd_histo.protocol.plan.KINDS``. Not here: figures of one model (confusion matrices, ROC, the
cascade: ``kd_histo.evaluation.plots``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kd_histo.evaluation.plots import plt, save_png
from kd_histo.protocol import plan
from kd_histo.protocol.plan import RunKind, run_kind

_Y_SEEDS = "accuracy (mean ± sd over seeds; dots: seeds)"


def _seed_dots(ax, seed_rows, rows, x_of) -> None:
    """Small dots for every seed of each plotted run (``x_of(row)`` = its x, or None to skip)."""
    xs = {r["run"]: x_of(r) for r in rows}
    for r in seed_rows:
        x = xs.get(r["run"])
        if x is not None:
            ax.plot(x, r["accuracy"], ".", color="black", ms=3, alpha=0.5, zorder=3)


def series_label(kind: RunKind, extra: bool) -> str:
    """The legend label of a kind's points, with or without extra unlabeled data."""
    return kind.label + (" + unlabeled" if extra else "")


def gflops_series(rows: Sequence[dict]) -> list[tuple[RunKind, bool, list[dict]]]:
    """The point groups of accuracy vs compute, in :data:`KINDS`' order: per kind, its rows with
    GFLOPs without and then with extra unlabeled data, each sorted by GFLOPs."""
    out = []
    for kind in plan.KINDS:
        pts = sorted(
            (r for r in rows if r["kind"] == kind.name and r.get("gflops")),
            key=lambda r: r["gflops"],
        )
        for extra in (False, True):
            sel = [r for r in pts if (r.get("unlabeled_fraction", 0) > 0) == extra]
            if sel:
                out.append((kind, extra, sel))
    return out


def _interval(sel: Sequence[dict]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Accuracies and their error bars [below, above] (low/high default to the accuracy)."""
    y = np.array([r["accuracy"] for r in sel])
    lo = np.array([r.get("accuracy_low", r["accuracy"]) for r in sel])
    hi = np.array([r.get("accuracy_high", r["accuracy"]) for r in sel])
    return y, [y - lo, hi - y]


def accuracy_vs_gflops_png(
    rows: Sequence[dict], path: str, title: str = "", seed_rows: Sequence[dict] | None = None
) -> str:
    """Accuracy (with its 95% interval) against GFLOPs per image, one point per model.

    ``rows`` are result rows with ``run``, ``kind``, ``gflops``, ``accuracy``, ``accuracy_low``,
    ``accuracy_high``, ``unlabeled_fraction``; runs with extra unlabeled data are drawn hollow.
    Nets of one input size share their GFLOPs, so each kind is nudged sideways a little (its
    ``nudge``: a few percent on the log axis) to keep the points apart. With ``seed_rows`` (the
    single seeds' rows), ``rows`` are the seeds' means with low/high = mean ∓ sd, and each seed is
    drawn as a small dot. Returns ``path``.
    """
    fig, ax = plt.subplots(figsize=(8, 5.5))
    placed: dict[str, float] = {}
    for kind, extra, sel in gflops_series(rows):
        x = np.array([r["gflops"] * kind.nudge[extra] for r in sel])
        y, yerr = _interval(sel)
        ax.errorbar(
            x,
            y,
            yerr=yerr,
            fmt=kind.marker,
            ms=kind.size,
            color=kind.colour,
            capsize=3,
            label=series_label(kind, extra),
            mfc="white" if extra else kind.colour,
            ls="-" if kind.mode != "teacher" and not extra else "none",
            lw=1,
            alpha=0.9,
        )
        left = kind.mode == "baseline"  # a baseline's name left of its point, the others right
        for r, xi in zip(sel, x):
            placed[r["run"]] = xi
            ax.annotate(
                r["run"],
                (xi, r["accuracy"]),
                textcoords="offset points",
                xytext=(-5, 5) if left else (5, 5),
                ha="right" if left else "left",
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
    return save_png(fig, path, dpi=110)


def _by_fraction(kind: RunKind) -> bool:
    """Kinds that run at every unlabeled fraction: a line each per factor."""
    return kind.unlabeled == "every"


def accuracy_vs_unlabeled_png(
    rows: Sequence[dict], path: str, title: str = "", seed_rows: Sequence[dict] | None = None
) -> str:
    """Student accuracy against the fraction of extra unlabeled data, one line per factor (and per
    kind that runs at every fraction).

    The baseline of each factor (LR + labels) is a dashed line of the same colour, the teacher a
    dotted black line. With ``seed_rows``, ``rows`` are the seeds' means (bars ± sd) and each
    seed's student is a small dot. Returns ``path``.
    """
    fig, ax = plt.subplots(figsize=(7, 5))
    factors = sorted({r["factor"] for r in rows if _by_fraction(run_kind(r["kind"]))})
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.85, max(1, len(factors))))
    for factor, colour in zip(factors, colours):
        for kind in filter(_by_fraction, plan.KINDS):
            pts = sorted(
                (r for r in rows if r["kind"] == kind.name and r["factor"] == factor),
                key=lambda r: r["unlabeled_fraction"],
            )
            if not pts:
                continue
            x = np.array([100 * r["unlabeled_fraction"] for r in pts])
            y, yerr = _interval(pts)
            ax.errorbar(
                x,
                y,
                yerr=yerr,
                fmt=f"{kind.marker}-",
                color=colour,
                capsize=3,
                label=f"{kind.label} x{factor:g}",
            )
        for b in rows:
            if run_kind(b["kind"]).mode == "baseline" and b["factor"] == factor:
                label = f"{run_kind(b['kind']).label} x{factor:g}"
                ax.axhline(b["accuracy"], color=colour, ls="--", lw=1, label=label)
    for t in (r for r in rows if run_kind(r["kind"]).mode == "teacher"):
        label = f"{run_kind(t['kind']).label} (HR)"
        ax.axhline(t["accuracy"], color="black", ls=":", lw=1.2, label=label)
    if seed_rows:
        _seed_dots(
            ax,
            seed_rows,
            rows,
            lambda r: 100 * r["unlabeled_fraction"] if _by_fraction(run_kind(r["kind"])) else None,
        )
    ax.set(
        xlabel="extra unlabeled data (% of the unlabeled pool)",
        ylabel=_Y_SEEDS if seed_rows else "accuracy (95% CI)",
        title=title or "label-free distillation: more unlabeled data",
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save_png(fig, path, dpi=110)
