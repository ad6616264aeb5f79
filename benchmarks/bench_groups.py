"""python benchmarks/bench_groups.py --input_dir=../shared/data/lc25000_lung \\
      --groups_csv=../shared/data/lc25000_lung_groups.csv

How well each --group_by keeps augmented copies of one original in one split, measured against the
true originals: pairwise precision/recall of the groups, the largest group's share, and, for
several split seeds, the share of test (and val, unlabeled) tiles that have a tile of their
original in train. It plans the conversion exactly as kd-histo-convert does (same grouping code,
same splits) without writing shards, and prints a markdown table and one JSON object per grouping.
Timings are wall clock of the plan (reading, grouping, splitting) and depend on machine load.
"""

from __future__ import annotations

import csv
import json
import os
import time

import numpy as np
from absl import app, flags

from kd_histo.convert import ConvertConfig, EncodeOptions, neardup
from kd_histo.convert import plan as plan_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("input_dir", "", "Folder of class subfolders.")
flags.DEFINE_string("groups_csv", "", "True groups: CSV path,group_id (relative to input_dir).")
flags.DEFINE_list("group_by", ["near_duplicates", "phash"], "Groupings to measure.")
flags.DEFINE_list("split_fractions", ["0.3", "0.15", "0.15", "0.4"], "Split shares.")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Split seeds.")


def measure(group_by: str, truth: dict[str, str]) -> dict:
    fractions = tuple(float(x) for x in FLAGS.split_fractions)
    leaks: dict[str, list[float]] = {"test": [], "val": [], "unlabeled": []}
    out = {"group_by": group_by}
    for k, seed in enumerate(int(s) for s in FLAGS.seeds):
        cfg = ConvertConfig(
            out_dir="unused",
            input_dir=FLAGS.input_dir,
            group_by=group_by,
            fractions=fractions,
            seed=seed,
            encode=EncodeOptions(tile_px=112, fit="resize"),
            leakage_check=k == 0,
        )
        t0 = time.perf_counter()
        plan = plan_lib.make_plan(cfg)
        if k == 0:
            out["plan_s"] = round(time.perf_counter() - t0, 1)
            out["check"] = next((n for n in plan.notes if n.startswith("leakage check")), None)
        items = [(it, u.split) for u in plan.units for it in u.items]
        rel = [os.path.relpath(it.path, FLAGS.input_dir) for it, _ in items]
        true = np.array([truth[r] for r in rel])
        split = np.array([s for _, s in items])
        if k == 0:
            pred = np.unique([it.slide_id for it, _ in items], return_inverse=True)[1]
            p, r = neardup.pair_precision_recall(pred, np.unique(true, return_inverse=True)[1])
            out.update(
                tiles=len(items),
                groups=int(pred.max()) + 1,
                pair_precision=round(p, 3),
                pair_recall=round(r, 3),
                largest_group_share=round(np.bincount(pred).max() / len(pred), 4),
            )
        in_train = set(true[split == "train"])
        for s in leaks:
            leaks[s].append(float(np.mean([t in in_train for t in true[split == s]])))
    for s, v in leaks.items():
        out[f"{s}_leak_mean"] = round(float(np.mean(v)), 3)
        out[f"{s}_leak_max"] = round(float(np.max(v)), 3)
    out["test_leak_per_seed"] = [round(x, 3) for x in leaks["test"]]
    return out


def main(argv):
    del argv
    with open(FLAGS.groups_csv, newline="") as f:
        truth = {os.path.normpath(r["path"]): r["group_id"] for r in csv.DictReader(f)}
    results = [measure(g, truth) for g in FLAGS.group_by]
    print(
        "| group_by | groups | pair precision | pair recall | largest group | test tiles with "
        "their original in train (mean / max over seeds) | val | unlabeled | plan s |"
    )
    print("|---|---:|---:|---:|---:|---|---|---|---:|")
    for r in results:
        print(
            f"| {r['group_by']} | {r['groups']} | {r['pair_precision']:.3f} | "
            f"{r['pair_recall']:.3f} | {100 * r['largest_group_share']:.1f}% | "
            f"{100 * r['test_leak_mean']:.1f}% / "
            f"{100 * r['test_leak_max']:.1f}% | {100 * r['val_leak_mean']:.1f}% | "
            f"{100 * r['unlabeled_leak_mean']:.1f}% | {r['plan_s']} |"
        )
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    app.run(main)
