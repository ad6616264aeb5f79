"""kd-histo-evaluate: metrics of a trained run on a split, or one table comparing several runs.

    kd-histo-evaluate --model_dir=runs/demo/student_x4 --split=test
    kd-histo-evaluate --compare=runs/demo/teacher/eval_test,runs/demo/student_x4/eval_test \
        --compare_out=runs/demo/comparison

Flags -> ``kd_histo.evaluate.EvalConfig`` -> ``evaluate_run`` (metrics.json, predictions.csv,
confusion_matrix.png, roc.png), or ``compare_runs`` (markdown + CSV).
"""

from __future__ import annotations

from kd_histo.cli import flags_common as fc

PROG = "kd-histo-evaluate"
fc.define_evaluate_flags()
FLAGS = fc.FLAGS


def main(argv: list[str]) -> None:
    del argv
    from kd_histo import evaluate

    if FLAGS.compare:
        out = evaluate.compare_runs(FLAGS.compare, FLAGS.compare_out, FLAGS.names or None)
        print(f"{PROG}: comparison written to {out['markdown']} and {out['csv']}")
        print(open(out["markdown"]).read(), end="")
        return
    fc.require(model_dir=FLAGS.model_dir)
    cfg = evaluate.EvalConfig(model_dir=FLAGS.model_dir, split=FLAGS.split, data_dir=FLAGS.data_dir or "",
                              out_dir=FLAGS.out_dir, batch_size=FLAGS.batch_size, n_boot=FLAGS.n_boot,
                              skip_corrupt=FLAGS.skip_corrupt)
    paths = evaluate.evaluate_run(cfg)
    import json

    metrics = json.load(open(paths["metrics"]))
    m = metrics["tile"]
    if cfg.skip_corrupt:
        print(f"{PROG}: --skip_corrupt: {metrics['n_corrupt_skipped']} corrupt records skipped in {cfg.split}")
    print(f"{PROG}: {cfg.split} tiles {m['n']}: accuracy {m['accuracy']:.4f}, balanced {m['balanced_accuracy']:.4f}, "
          f"macro F1 {m['macro_f1']:.4f}; written to {paths['metrics']}")


def run() -> None:
    fc.run(PROG, main)


if __name__ == "__main__":
    run()
