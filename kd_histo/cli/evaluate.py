"""kd-histo-evaluate: metrics of a trained run on a split, or one table comparing several runs.

    kd-histo-evaluate --model_dir=runs/demo/student_x4 --split=test
    kd-histo-evaluate --model_dir=runs/demo/student_x4 --split=test
    --cascade_teacher=runs/demo/teacher
    kd-histo-evaluate --compare=runs/demo/teacher/eval_test,runs/demo/student_x4/eval_test \
        --compare_out=runs/demo/comparison

Flags -> ``kd_histo.evaluation.evaluate.EvalConfig`` -> ``evaluate_run`` (metrics.json,
predictions.csv,
confusion_matrix.png, roc.png; with --cascade_teacher also cascade.csv/.json/.png: accuracy,
effective GFLOPs per tile and measured tiles/s at each --cascade_fractions), or ``compare_runs``
(markdown + CSV).
"""

from __future__ import annotations

import json

from kd_histo.cli import flags_common as fc
from kd_histo.evaluation.evaluate import EvalConfig

PROG = "kd-histo-evaluate"
CONFIGS = (EvalConfig,)
OWN_FLAGS = ("compare", "names", "compare_out")  # the comparison table of finished evaluations
fc.define_binary_flags(CONFIGS, OWN_FLAGS)
FLAGS = fc.FLAGS


def main(argv: list[str]) -> None:
    del argv
    from kd_histo.evaluation import compare_table, evaluate

    if FLAGS.compare:
        out = compare_table.compare_runs(FLAGS.compare, FLAGS.compare_out, FLAGS.names or None)
        print(f"{PROG}: comparison written to {out['markdown']} and {out['csv']}")
        fc.print_file(out["markdown"])
        return
    cfg = EvalConfig(**fc.config_kwargs(EvalConfig))
    paths = evaluate.evaluate_run(cfg)

    metrics = json.load(open(paths["metrics"]))
    m = metrics["tile"]
    if cfg.skip_corrupt:
        fc.log(
            f"--skip_corrupt: {metrics['n_corrupt_skipped']} corrupt records skipped in {cfg.split}"
        )
    print(
        f"{PROG}: {cfg.split} tiles {m['n']}: accuracy {m['accuracy']:.4f}, balanced "
        f"{m['balanced_accuracy']:.4f}, "
        f"macro F1 {m['macro_f1']:.4f}; written to {paths['metrics']}"
    )
    if "linear_probe" in metrics:  # an embedding-only teacher's student
        p = metrics["linear_probe"]
        t = p["teacher_accuracy"]
        print(
            f"{PROG}: linear heads on {cfg.split}: student {p['student_accuracy']:.4f}, teacher "
            f"probe {'not measured' if t is None else format(t, '.4f')} (fit on "
            f"{p['train_tiles']} train tiles: student {p['student_train_accuracy']:.4f}, "
            f"teacher probe {p['teacher_train_accuracy']:.4f})"
        )
    if "ood" in metrics:
        o = metrics["ood"]
        print(
            f"{PROG}: out of the model's domain: {100 * o['flagged_fraction']:.1f}% of the tiles "
            f"(calibrated to {100 * o['calibrated_flag_fraction']:.0f}% of val)"
        )
        for line in o["warnings"]:
            print(f"{PROG}: warning: {line}")
    if "cascade_csv" in paths:
        for r in json.load(open(paths["cascade_json"]))["rows"]:
            who = (
                "teacher alone"
                if r["scored_by"] == "teacher"
                else f"teacher on {100 * r['teacher_share']:.1f}%"
            )
            print(
                f"{PROG}: cascade, {who}: accuracy {r['accuracy']:.4f}, {r['gflops_per_tile']:.4f} "
                "GFLOPs/tile, "
                f"{r['tiles_per_s']:.0f} tiles/s ({r['speedup_vs_teacher']:.1f}x the teacher)"
            )
        from kd_histo.evaluation.cascade import cheapest_within

        best = cheapest_within(json.load(open(paths["cascade_json"]))["rows"], points=1.0)
        print(
            f"{PROG}: cascade: "
            + (
                "no measured share is within 1 pt of the teacher alone"
                if best is None
                else f"the teacher on {100 * best['teacher_share']:.1f}% of the tiles is within 1 "
                "pt of the teacher alone, "
                f"at {best['speedup_vs_teacher']:.1f}x its tiles/s"
            )
        )
        print(f"{PROG}: cascade curve written to {paths['cascade_csv']} and {paths['cascade_png']}")


run = fc.entry_point(PROG, main)

if __name__ == "__main__":
    run()
