"""The paper's claims, read off an experiment's results, one row per factor.

DiPalma et al. claim that a label-free student at a lower resolution (1) comes close to, or beats,
its teacher, (2) beats the LR baseline trained with labels, most at the lowest resolution, and (3)
gains from more unlabeled data. :func:`factor_claims` measures each on the results: the best
label-free student of each factor (highest mean accuracy over seeds) against the teacher and
against the baseline (the paired difference and its 95% interval from the report's paired table),
and the label-free students' mean accuracy as the unlabeled fraction grows (which kinds are the
teacher, the baselines and the label-free students: ``kd_histo.protocol.plan.KINDS``). Nothing is
judged against a threshold here: the numbers are what the report prints.

Pure: rows in (``rows.result_rows`` / ``rows.paired_table``), records out.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from kd_histo.protocol.plan import run_kind


@dataclasses.dataclass(frozen=True)
class FactorClaims:
    """The claims at one resolution factor (accuracies 0-1, means over seeds)."""

    factor: float
    teacher: float
    baseline: float | None
    best_student: str  # the label-free student with the highest mean accuracy
    best_student_accuracy: float
    vs_baseline: Mapping[str, Any] | None  # its paired row (difference, low, high, seeds)
    by_fraction: tuple[tuple[float, float], ...]  # (unlabeled fraction, mean accuracy), ascending

    @property
    def vs_teacher(self) -> float:
        return self.best_student_accuracy - self.teacher

    @property
    def non_decreasing(self) -> bool:
        """Accuracy never falls as the unlabeled fraction grows."""
        accs = [a for _, a in self.by_fraction]
        return all(b >= a for a, b in itertools.pairwise(accs))


def _mode(row: Mapping[str, Any]) -> str:
    return run_kind(row["kind"]).mode


def _label_free(row: Mapping[str, Any]) -> bool:
    return run_kind(row["kind"]).label_free


def _by_seed(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        out.setdefault(r["run"], {})[int(r["seed"])] = float(r["accuracy"])
    return out


def factor_claims(
    rows: Sequence[Mapping[str, Any]], prows: Sequence[Mapping[str, Any]]
) -> list[FactorClaims]:
    """One :class:`FactorClaims` per factor that has a label-free student and a teacher.

    The teacher's and the baseline's means are taken over the seeds the best student ran with, so
    a partial experiment compares like with like.

    Args:
      rows: result rows (``seed``, ``run``, ``kind``, ``factor``, ``unlabeled_fraction``,
        ``accuracy``), several seeds allowed.
      prows: paired rows (``student``, ``baseline``, ``difference``, ``low``, ``high``, ``seeds``).
    """
    acc = _by_seed(rows)
    means = {name: statistics.fmean(v.values()) for name, v in acc.items()}
    first = {}
    for r in rows:
        first.setdefault(r["run"], r)
    teacher_run = next((n for n, r in first.items() if _mode(r) == "teacher"), None)
    if teacher_run is None:
        return []

    def mean_at(name: str, seeds) -> float | None:
        vals = [acc[name][s] for s in seeds if s in acc.get(name, {})]
        return statistics.fmean(vals) if vals else None

    out = []
    for factor in sorted({float(r["factor"]) for r in rows if _label_free(r)}):
        students = [r for r in first.values() if _label_free(r) and float(r["factor"]) == factor]
        best = max(students, key=lambda r: (means[r["run"]], -float(r["unlabeled_fraction"])))
        seeds = sorted(acc[best["run"]])
        teacher = mean_at(teacher_run, seeds)
        if teacher is None:
            continue
        base = next(
            (
                n
                for n, r in first.items()
                if _mode(r) == "baseline" and float(r["factor"]) == factor
            ),
            None,
        )
        out.append(
            FactorClaims(
                factor=factor,
                teacher=teacher,
                baseline=mean_at(base, seeds) if base else None,
                best_student=best["run"],
                best_student_accuracy=means[best["run"]],
                vs_baseline=next((p for p in prows if p["student"] == best["run"]), None),
                by_fraction=tuple(
                    sorted((float(r["unlabeled_fraction"]), means[r["run"]]) for r in students)
                ),
            )
        )
    return out


def claims_markdown(claims: Sequence[FactorClaims]) -> str:
    """The claims as a markdown table (accuracies as fractions, differences in points)."""
    lines = [
        (
            "| factor | teacher | baseline | best label-free student | − teacher | − baseline [95% "
            "CI] "
            "| by unlabeled fraction | never falls |"
        ),
        "|---:|---:|---:|---|---:|---|---|---|",
    ]
    for c in claims:
        base = "-" if c.baseline is None else f"{c.baseline:.3f}"
        p = c.vs_baseline
        vs_base = (
            "-"
            if p is None
            else (
                f"{100 * p['difference']:+.1f} [{100 * p['low']:+.1f}, {100 * p['high']:+.1f}] pts "
                f"({p['seeds']} seed{'' if p['seeds'] == 1 else 's'})"
            )
        )
        fractions = ", ".join(f"{100 * f:g}%: {a:.3f}" for f, a in c.by_fraction)
        lines.append(
            f"| x{c.factor:g} | {c.teacher:.3f} | {base} | {c.best_student} "
            f"{c.best_student_accuracy:.3f} | "
            f"{100 * c.vs_teacher:+.1f} pts | {vs_base} | {fractions} | "
            f"{'yes' if c.non_decreasing else 'no'} |"
        )
    return "\n".join(lines) + "\n"
