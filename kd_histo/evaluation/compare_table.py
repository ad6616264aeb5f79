"""Several runs' evaluations in one table (teacher, baselines, students): markdown and CSV.

Not here: the evaluation of one run (``kd_histo.evaluation.evaluate``).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence

from kd_histo.evaluation.evaluate import METRICS_JSON

COMPARE_COLUMNS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")


def compare_runs(
    eval_dirs: Sequence[str], out_prefix: str, names: Sequence[str] | None = None
) -> dict[str, str]:
    """Evaluations in one table (teacher, baselines, students): ``<out_prefix>.md``/``.csv``."""
    names = list(names) if names else [_run_name(d) for d in eval_dirs]
    rows = []
    for name, d in zip(names, eval_dirs):
        path = os.path.join(d, METRICS_JSON)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found; run kd-histo-evaluate on that run first")
        with open(path) as f:
            m = json.load(f)
        row = {"run": name, "n_tiles": m["tile"]["n"]}
        for level in ("tile", "slide_mean", "slide_majority"):
            for col in COMPARE_COLUMNS:
                if level in m:
                    ci = m[level]["ci95"].get(col, {})
                    row[f"{level}_{col}"] = m[level][col]
                    row[f"{level}_{col}_ci"] = (ci.get("low"), ci.get("high"))
        rows.append(row)
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    keys = [k for k in rows[0] if not k.endswith("_ci")]
    with open(out_prefix + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    shown = [f"tile_{c}" for c in COMPARE_COLUMNS] + [
        f"slide_mean_{c}" for c in ("accuracy", "macro_f1")
    ]
    lines = ["| run | tiles | " + " | ".join(shown) + " |", "|---|---:|" + "---:|" * len(shown)]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['n_tiles']} | " + " | ".join(_cell(r, k) for k in shown) + " |"
        )
    with open(out_prefix + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"markdown": out_prefix + ".md", "csv": out_prefix + ".csv"}


def _run_name(eval_dir: str) -> str:
    """``runs/teacher/eval_test`` -> "teacher"; any other folder -> its own name."""
    path = os.path.normpath(eval_dir)
    base = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if base.startswith("eval_") else base


def _cell(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    lo, hi = row.get(key + "_ci", (None, None))
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else f"{v:.3f}"
