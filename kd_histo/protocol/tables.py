"""The markdown and CSV tables of an experiment's results, from its rows (pure).

``markdown_table`` is the one-glance table (model, input px, cost, measured speedup, accuracy with
its 95% interval, gap to the teacher); ``seeds_markdown`` the several-seed table (mean ± sd, each
seed, the paired difference to the baseline); ``paired_markdown`` and ``cascade_markdown`` the
paired comparisons and the cascade; ``results_markdown`` puts them together as results.md, and
``csv_text`` writes rows as CSV.

Not here: the rows themselves (``kd_histo.protocol.rows``), files (``kd_histo.protocol.report``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from kd_histo.protocol.claims import claims_markdown, factor_claims
from kd_histo.protocol.plan import run_kind
from kd_histo.protocol.rows import CSV_COLUMNS, seed_summary


def cascade_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The cascade table: student + teacher on the least confident share of the tiles."""
    lines = [
        "| student | teacher share | accuracy | gap to teacher | effective GFLOPs/tile | tiles/s | "
        "measured speedup | seed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {100 * r['teacher_share']:.1f}% | {r['accuracy']:.3f} | "
            f"{100 * r['gap_to_teacher']:+.1f} pts | {r['gflops_per_tile']:.4f} | "
            f"{r['tiles_per_s']:.0f} | "
            f"{r['speedup_vs_teacher']:.1f}x | {r['seed']} |"
        )
    return "\n".join(lines) + "\n"


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The one-glance table: model, input px, cost, measured speedup, accuracy [95% CI], gap."""
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "| model | input px | GFLOPs/image | FLOPs ÷ | measured speedup | accuracy [95% CI] | "
        "macro F1 | "
        "gap to teacher |" + (" seed |" if len(seeds) > 1 else ""),
        "|---|---:|---:|---:|---:|---|---:|---:|" + ("---:|" if len(seeds) > 1 else ""),
    ]
    for r in rows:
        acc = (
            f"{r['accuracy']:.3f} [{_num(r['accuracy_low'], '.3f')}, "
            f"{_num(r['accuracy_high'], '.3f')}]"
        )
        gap = (
            "—"
            if run_kind(r["kind"]).mode == "teacher"
            else _num(None if r["gap_to_teacher"] is None else 100 * r["gap_to_teacher"], "+.1f")
            + " pts"
        )
        lines.append(
            f"| {r['run']} | {r['input_px']} | {_num(r['gflops'], '.4f')} | "
            f"{_num(r['flops_ratio'], '.1f')} | "
            f"{_num(r['speedup'], '.1f')}x | {acc} | {r['macro_f1']:.3f} | {gap} |"
            + (f" {r['seed']} |" if len(seeds) > 1 else "")
        )
    return "\n".join(lines) + "\n"


def seeds_markdown(rows: Sequence[dict[str, Any]], prows: Sequence[dict[str, Any]] = ()) -> str:
    """The several-seed table: one row per model, accuracy mean ± sd and every seed's value, and
    each student's paired difference to the baseline of its factor (from :func:`paired_table`).

    Cost columns are the first seed's (the nets of one run name have one architecture and input).
    """
    paired_by = {r["student"]: r for r in prows}
    lines = [
        (
            "| model | input px | GFLOPs/image | measured speedup | accuracy, mean ± sd | per seed "
            "| "
            "− baseline, paired [95% CI] |"
        ),
        "|---|---:|---:|---:|---|---|---|",
    ]
    for s in seed_summary(rows):
        first = next(r for r in rows if r["run"] == s["run"])
        p = paired_by.get(s["run"])
        diff = (
            f"{100 * p['difference']:+.1f} [{100 * p['low']:+.1f}, {100 * p['high']:+.1f}] pts"
            if p
            else "—"
        )
        lines.append(
            f"| {s['run']} | {first['input_px']} | {_num(first['gflops'], '.4f')} | "
            f"{_num(first['speedup'], '.1f')}x | {s['accuracy_mean']:.3f} ± {s['accuracy_sd']:.3f} "
            "| "
            f"{' / '.join(f'{v:.3f}' for v in s['accuracy_values'])} | {diff} |"
        )
    return "\n".join(lines) + "\n"


def paired_markdown(prows: Sequence[dict[str, Any]]) -> str:
    """The paired comparisons as a markdown table (points of accuracy)."""
    lines = [
        "| factor | student | − baseline | seeds | tiles | difference [95% CI] | per seed |",
        "|---:|---|---|---:|---:|---|---|",
    ]
    for r in prows:
        per = ", ".join(f"{100 * d:+.1f}" for d in r["per_seed"])
        ci = f"[{100 * r['low']:+.1f}, {100 * r['high']:+.1f}]"
        lines.append(
            f"| x{r['factor']:g} | {r['student']} | {r['baseline']} | {r['seeds']} | "
            f"{r['n_tiles']} | {100 * r['difference']:+.1f} {ci} pts | {per} |"
        )
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str] = CSV_COLUMNS) -> str:
    """``rows`` as CSV with the given columns (other keys left out)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


# Paragraphs of report.md that say how a table was made (each comes before its table).
CASCADE_NOTE = (
    "Cascade: each student scores every tile, its seed's teacher re-scores the least confident "
    "share of them at high resolution (`kd_histo.evaluation.cascade`). Effective GFLOPs per tile = "
    "student + "
    "share x teacher; tiles/s measured with both nets on the split's tiles held in memory (reading "
    "not timed), the speedup relative to the teacher alone on the same tiles (`cascade.csv`)."
)
PAIRED_NOTE = (
    "Student − baseline of the same factor, paired (same seed, split and tiles): mean over "
    "seeds and tiles, 95% CI by bootstrap resampling seeds and slides (near-duplicate "
    "groups when the split was made with them) together:"
)

SEEDS_NOTE = (
    "Over seeds: test accuracy mean ± sd, each seed's value (in seed order), and each student's "
    "paired difference to the baseline of its factor (same seed and tiles; 95% CI by bootstrap "
    "over seeds and slides together):"
)
EVERY_SEED_NOTE = "Every run of every seed:"

CLAIMS_NOTE = (
    "The paper's claims per factor: the label-free student with the highest mean accuracy against "
    "the teacher and (paired, as above) against the LR baseline, and the label-free students' mean "
    "accuracy as the unlabeled fraction grows:"
)


def results_markdown(rows: Sequence[dict[str, Any]], prows: Sequence[dict[str, Any]]) -> str:
    """results.md: with several seeds the several-seed table first, then every run's row, the
    paired comparisons and the paper's claims."""
    claims = factor_claims(rows, prows) if rows else []
    several = len({r["seed"] for r in rows}) > 1
    return (
        ((seeds_markdown(rows, prows) + "\n" + EVERY_SEED_NOTE + "\n\n") if several else "")
        + markdown_table(rows)
        + (("\n" + paired_markdown(prows)) if prows else "")
        + (("\n" + CLAIMS_NOTE + "\n\n" + claims_markdown(claims)) if claims else "")
    )
