"""An experiment's result rows: one per evaluated run, cascade share or paired comparison.

``result_rows`` (pure) joins each run's evaluation (metrics.json), its input size, the cost of
that input size and the wall time into one row, with the gap to the teacher of the same seed;
``cascade_rows`` reads each student's cascade with its teacher; ``seed_summary`` and ``mean_rows``
summarise several seeds; ``paired_table`` gives each student's paired difference to the baseline
of its factor (same seed and split) with a 95% interval over seeds and tiles
(``kd_histo.protocol.paired``), from the per-tile scores ``read_correct`` reads. Each run's kind
(teacher, baseline, student) is looked up in ``kd_histo.protocol.plan.KINDS``.

Not here: writing tables (``kd_histo.protocol.tables``) or the report folder
(``kd_histo.protocol.report``).
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kd_histo.evaluation.evaluate import CASCADE_JSON, METRICS_JSON, PREDICTIONS_CSV
from kd_histo.protocol import paired
from kd_histo.protocol.plan import cascade_dir, eval_dir, kind_rank, run_kind

CSV_COLUMNS = (
    "seed",
    "run",
    "kind",
    "factor",
    "input_px",
    "unlabeled_fraction",
    "n_eval",
    "accuracy",
    "accuracy_low",
    "accuracy_high",
    "balanced_accuracy",
    "macro_f1",
    "macro_auc",
    "slide_accuracy",
    "gap_to_teacher",
    "gflops",
    "flops_ratio",
    "speedup",
    "train_s",
)


def read_metrics(spec, split: str) -> dict[str, Any] | None:
    """A run's metrics.json on ``split``; None before it is evaluated."""
    path = os.path.join(eval_dir(spec, split), METRICS_JSON)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def result_rows(
    specs: Sequence,
    metrics: Mapping[str, dict],
    state: Mapping[str, dict],
    costs: Mapping[int, dict] | None,
) -> list[dict[str, Any]]:
    """One row per evaluated run.

    Args:
      specs: the experiment's RunSpecs.
      metrics: ``"s<seed>/<name>"`` -> that run's metrics.json (runs without one are left out).
      state: ``"s<seed>/<name>"`` -> {"train_s", "eval_s"} (experiment state.json).
      costs: input px -> cost row (``gflops``, ``flops_ratio_to_ref``, ``speedup``), or None
        before the cost is measured.

    Returns:
      Rows with the keys of :data:`CSV_COLUMNS` (None where unknown).
    """
    rows = []
    for spec in specs:
        key = f"s{spec.seed}/{spec.name}"
        m = metrics.get(key)
        if m is None:
            continue
        tile, ci = m["tile"], m["tile"]["ci95"]["accuracy"]
        px = int(m["run"]["input_px"])
        c = (costs or {}).get(px, {})
        rows.append(
            {
                "seed": spec.seed,
                "run": spec.name,
                "kind": spec.kind,
                "factor": spec.factor,
                "input_px": px,
                "unlabeled_fraction": spec.unlabeled_fraction,
                "n_eval": tile["n"],
                "accuracy": tile["accuracy"],
                "accuracy_low": ci["low"],
                "accuracy_high": ci["high"],
                "balanced_accuracy": tile["balanced_accuracy"],
                "macro_f1": tile["macro_f1"],
                "macro_auc": tile["macro_auc"],
                "slide_accuracy": m["slide_mean"]["accuracy"] if "slide_mean" in m else None,
                "gap_to_teacher": None,
                "gflops": c.get("gflops"),
                "flops_ratio": c.get("flops_ratio_to_ref"),
                "speedup": c.get("speedup"),
                "train_s": state.get(key, {}).get("train_s"),
            }
        )
    # Reading order: per seed, the teacher, then per factor the baseline and the students by
    # growing unlabeled fraction (training order differs: the largest pool trains first).
    rows.sort(key=lambda r: (r["seed"], r["factor"], kind_rank(r["kind"]), r["unlabeled_fraction"]))
    teacher = {r["seed"]: r["accuracy"] for r in rows if run_kind(r["kind"]).mode == "teacher"}
    for r in rows:
        if r["seed"] in teacher:
            r["gap_to_teacher"] = r["accuracy"] - teacher[r["seed"]]
    return rows


CASCADE_COLUMNS = (
    "seed",
    "run",
    "factor",
    "teacher_share",
    "n_teacher",
    "n_tiles",
    "accuracy",
    "gap_to_teacher",
    "gflops_per_tile",
    "tiles_per_s",
    "speedup_vs_teacher",
)


def cascade_rows(specs: Sequence, split: str) -> list[dict[str, Any]]:
    """One row per measured teacher share of each student's cascade
    (``cascade_<split>/cascade.json``), with the gap to the teacher alone on the same tiles."""

    out = []
    for spec in specs:
        path = os.path.join(cascade_dir(spec, split), CASCADE_JSON)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            rows = json.load(f)["rows"]
        teacher = next(r for r in rows if r["scored_by"] == "teacher")
        for r in rows:
            if r["scored_by"] == "cascade":
                out.append(
                    {
                        "seed": spec.seed,
                        "run": spec.name,
                        "factor": spec.factor,
                        **{k: r[k] for k in CASCADE_COLUMNS[3:] if k in r},
                        "gap_to_teacher": r["accuracy"] - teacher["accuracy"],
                    }
                )
    return out


def seed_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of each run's accuracy and gap (several seeds)."""
    out = []
    for name in dict.fromkeys(r["run"] for r in rows):
        sel = [r for r in rows if r["run"] == name]
        acc = paired.seed_stats([r["accuracy"] for r in sel])
        gaps = [r["gap_to_teacher"] for r in sel if r["gap_to_teacher"] is not None]
        out.append(
            {
                "run": name,
                "kind": sel[0]["kind"],
                "factor": sel[0]["factor"],
                "unlabeled_fraction": sel[0]["unlabeled_fraction"],
                "seeds": acc.n,
                "accuracy_mean": acc.mean,
                "accuracy_sd": acc.sd,
                "accuracy_values": list(acc.values),
                "gap_mean": statistics.fmean(gaps) if gaps else None,
            }
        )
    return out


def mean_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run for the figures: accuracy = the seeds' mean, low/high = mean ∓ sd.

    The other fields (kind, factor, input px, GFLOPs, unlabeled fraction) are the first seed's.
    """
    out = []
    for s in seed_summary(rows):
        first = next(r for r in rows if r["run"] == s["run"])
        m, sd = s["accuracy_mean"], s["accuracy_sd"]
        out.append(
            dict(first, accuracy=m, accuracy_low=m - sd, accuracy_high=m + sd, seeds=s["seeds"])
        )
    return out


def paired_table(
    specs: Sequence,
    correct: Mapping[str, Mapping[tuple, tuple[int, str]]],
    n_boot: int = 2000,
) -> list[dict[str, Any]]:
    """Each student against the baseline of its factor: paired accuracy difference over seeds.

    Args:
      specs: the experiment's RunSpecs.
      correct: ``"s<seed>/<name>"`` -> {tile key: (1 if correct else 0, slide id)} (see
        :func:`read_correct`); runs without predictions are left out.
      n_boot: bootstrap replicates.

    Returns:
      Rows ``factor, student, baseline, seeds, n_tiles, difference, low, high, per_seed``;
      differences are student minus baseline (accuracy, 0-1), only over seeds where both ran, and
      only over tiles both evaluated. Slides (or near-duplicate groups) are resampled whole.
    """
    out = []
    students = sorted(  # reading order: by factor, kind, then growing unlabeled fraction
        {
            (s.factor, kind_rank(s.kind), s.unlabeled_fraction, s.name)
            for s in specs
            if run_kind(s.kind).mode == "distill"
        }
    )
    for factor, _, _, name in students:
        base = next(
            (s.name for s in specs if run_kind(s.kind).mode == "baseline" and s.factor == factor),
            None,
        )
        if base is None:
            continue
        seeds = sorted(
            {
                s.seed
                for s in specs
                if f"s{s.seed}/{name}" in correct and f"s{s.seed}/{base}" in correct
            }
        )
        if not seeds:
            continue
        tables = [(correct[f"s{sd}/{name}"], correct[f"s{sd}/{base}"]) for sd in seeds]
        keys = sorted(set.intersection(*(set(a) & set(b) for a, b in tables)))
        if not keys:
            continue
        a = np.array([[t[0][k][0] for k in keys] for t in tables])
        b = np.array([[t[1][k][0] for k in keys] for t in tables])
        groups = [tables[0][0][k][1] for k in keys]
        diff = paired.paired_bootstrap(a, b, groups, n_boot=n_boot, seed=0)
        out.append(
            {
                "factor": factor,
                "student": name,
                "baseline": base,
                "seeds": diff.n_seeds,
                "n_tiles": diff.n_tiles,
                "difference": diff.mean,
                "low": diff.low,
                "high": diff.high,
                "per_seed": list(diff.per_seed),
            }
        )
    return out


def read_correct(spec, split: str) -> dict[tuple, tuple[int, str]] | None:
    """{(source, x, y): (correct, slide id)} of a run's labeled tiles; None if not evaluated."""
    return read_correct_folder(eval_dir(spec, split))


def scored_tile(row: Mapping[str, str], pred: str) -> tuple[tuple, tuple[int, str]]:
    """The key ``(source, x, y)`` and ``(correct, slide id)`` of one labeled tile of a predictions
    table (a run's ``predictions.csv`` or a bundle's ``tile_predictions.csv``), given its
    predicted class index."""
    return (row["source"], int(row["x"]), int(row["y"])), (
        int(int(pred) == int(row["label"])),
        row["slide_id"],
    )


def read_correct_folder(eval_folder: str) -> dict[tuple, tuple[int, str]] | None:
    """{(source, x, y): (correct, slide id)} of the labeled tiles in an evaluation folder's
    ``predictions.csv``; None when it holds none."""
    path = os.path.join(eval_folder, PREDICTIONS_CSV)
    if not os.path.isfile(path):
        return None
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if int(row["label"]) >= 0:
                key, score = scored_tile(row, row["pred"])
                out[key] = score
    return out
