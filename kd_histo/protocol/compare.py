"""Paired comparisons across experiments: an ablation's runs against the main run's.

An ablation changes one setting and reruns some of the main experiment's runs on the same data,
split and seeds (with ``--teachers_from``, against the same teachers). Its runs are then paired with
any run of the main experiment, e.g. the 30-epoch student against the 10-epoch baseline, or the
same student at both lengths: per seed and test tile, ``correct_a - correct_b``, with the 95%
interval of :func:`kd_histo.protocol.paired.paired_bootstrap` (seeds and original-image groups
resampled). Each side's wall time (``train_s`` in its experiment's ``state.json``) is reported with
it, so a pair can be read at equal epochs or at equal time.

A side is ``<folder>:<run>``: an experiment folder (``runs/<name>``, its run folders) or a
results folder under version control (``results/<name>``, its ``bundle/``), so comparisons of
committed seeds rerun from a fresh checkout. ``compare(a, b)`` is pure up to reading those
predictions and ``state.json``; ``tools/compare_runs.py`` is its command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
from collections.abc import Sequence

import numpy as np

from kd_histo.protocol import bundle as bundle_lib
from kd_histo.protocol import paired
from kd_histo.protocol.plan import STATE_JSON
from kd_histo.protocol.rows import read_correct_folder

_SEED_DIR = re.compile(r"^s(\d+)$")


@dataclasses.dataclass(frozen=True)
class RunRef:
    """One run of an experiment, over all its seeds: ``<experiment folder>:<run name>``."""

    experiment: str
    run: str

    @classmethod
    def parse(cls, text: str) -> RunRef:
        folder, sep, run = text.rpartition(":")
        if not sep or not folder or not run:
            raise ValueError(
                "expected <experiment folder>:<run name>, e.g. runs/lc25000:baseline_x8, got "
                f"{text!r}"
            )
        return cls(folder, run)

    def __str__(self) -> str:
        return f"{self.experiment}:{self.run}"


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Run a minus run b, paired over the seeds both evaluated and the tiles both scored."""

    label: str
    a: RunRef
    b: RunRef
    a_accuracy: paired.SeedStats
    b_accuracy: paired.SeedStats
    difference: paired.PairedDifference
    a_train_s: (
        float | None
    )  # mean wall time of one training run over the seeds; None = not recorded
    b_train_s: float | None


def _correct_by_seed(ref: RunRef, split: str) -> dict[int, dict[tuple, tuple[int, str]]]:
    """{seed: {tile: (correct, slide id)}} of ``ref``: from its experiment folder's run folders
    (``runs/s<seed>/<run>/eval_<split>/predictions.csv``) or, for a results folder under version
    control, from its bundle's ``tile_predictions.csv`` (a fresh checkout compares without
    retraining or importing anything)."""
    if (bundle := bundle_lib.find(ref.experiment)) is not None:
        return bundle_lib.correct_by_seed(bundle, ref.run, split)
    root = os.path.join(ref.experiment, "runs")
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"{ref.experiment} holds no runs/ folder nor a bundle/tile_predictions.csv: not an "
            "experiment "
            "folder (runs/<name>) nor a results folder (results/<name>)"
        )
    out = {}
    for name in os.listdir(root):
        m = _SEED_DIR.match(name)
        if m and (found := read_correct_folder(os.path.join(root, name, ref.run, f"eval_{split}"))):
            out[int(m.group(1))] = found
    return out


def _train_s(ref: RunRef, seeds: Sequence[int]) -> float | None:
    path = os.path.join(bundle_lib.find(ref.experiment) or ref.experiment, STATE_JSON)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        state = json.load(f)
    times = [state.get(f"s{s}/{ref.run}", {}).get("train_s") for s in seeds]
    return statistics.fmean(times) if times and None not in times else None


def compare(
    a: RunRef, b: RunRef, *, label: str = "", split: str = "test", n_boot: int = 2000
) -> Comparison:
    """Pairs run ``a`` with run ``b`` over the seeds both have and the tiles both evaluated.

    Raises:
      FileNotFoundError: a folder is neither an experiment nor a results folder, or a run was never
        evaluated on ``split``.
      ValueError: the two runs share no seed, or no test tile (other data sets or splits), or a
        results folder's runs were evaluated on another split.
    """
    tables = {}
    for ref in (a, b):
        found = _correct_by_seed(ref, split)
        if not found:
            raise FileNotFoundError(
                f"{ref}: no seed of this run was evaluated on {split} (no predictions.csv)"
            )
        tables[ref] = found
    seeds = sorted(set(tables[a]) & set(tables[b]))
    if not seeds:
        raise ValueError(
            f"{a} (seeds {sorted(tables[a])}) and {b} (seeds {sorted(tables[b])}) share no seed"
        )
    keys = sorted(set.intersection(*(set(tables[a][s]) & set(tables[b][s]) for s in seeds)))
    if not keys:
        raise ValueError(f"{a} and {b} share no evaluated tile: were they run on the same split?")
    ca = np.array([[tables[a][s][k][0] for k in keys] for s in seeds])
    cb = np.array([[tables[b][s][k][0] for k in keys] for s in seeds])
    groups = [tables[a][seeds[0]][k][1] for k in keys]
    return Comparison(
        label=label or f"{a.run} - {b.run}",
        a=a,
        b=b,
        a_accuracy=paired.seed_stats(ca.mean(1)),
        b_accuracy=paired.seed_stats(cb.mean(1)),
        difference=paired.paired_bootstrap(ca, cb, groups, n_boot=n_boot, seed=0),
        a_train_s=_train_s(a, seeds),
        b_train_s=_train_s(b, seeds),
    )


def markdown(rows: Sequence[Comparison]) -> str:
    """The comparisons as a markdown table (accuracy mean ± sd over seeds, difference in points)."""

    def acc(s: paired.SeedStats) -> str:
        return f"{s.mean:.3f} ± {s.sd:.3f}"

    def secs(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    lines = [
        "| change | a | b | seeds | a accuracy | b accuracy | a − b [95% CI] | per seed | train s "
        "a / b |",
        "|---|---|---|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        d = r.difference
        per = ", ".join(f"{100 * v:+.1f}" for v in d.per_seed)
        lines.append(
            f"| {r.label} | {r.a} | {r.b} | {d.n_seeds} | {acc(r.a_accuracy)} | "
            f"{acc(r.b_accuracy)} | "
            f"{100 * d.mean:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}] pts | {per} | "
            f"{secs(r.a_train_s)} / {secs(r.b_train_s)} |"
        )
    return "\n".join(lines) + "\n"
