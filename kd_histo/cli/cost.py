"""kd-histo-cost: FLOPs (from the TF graph), parameters, latency and memory of trained runs.

    kd-histo-cost --runs=runs/demo/teacher,runs/demo/baseline_x4,runs/demo/student_x4 \
        --out_dir=runs/demo/cost

The first run is the reference (the teacher): the table gives teacher FLOPs / run FLOPs, which is
near 4, 16, 64 for students at x2, x4, x8. Writes cost.json, cost.md and a TensorBoard trace of a
few training steps per run (``<out_dir>/trace/<name>``).
"""

from __future__ import annotations

from kd_histo.cli import flags_common as fc

PROG = "kd-histo-cost"
fc.define_cost_flags()
FLAGS = fc.FLAGS


def main(argv: list[str]) -> None:
    del argv
    from kd_histo.evaluation import cost
    fc.require(runs=FLAGS.runs)
    cfg = cost.CostConfig(runs=tuple(FLAGS.runs), out_dir=FLAGS.out_dir or "cost", names=tuple(FLAGS.names),
                          batch_sizes=fc.int_list(FLAGS.batch_sizes, "batch_sizes"), repeats=FLAGS.repeats,
                          profile_steps=FLAGS.trace_steps)
    out = cost.cost_of_runs(cfg)
    print(open(out["markdown"]).read(), end="")
    print(f"{PROG}: written to {out['json']} and {out['markdown']}")


def run() -> None:
    fc.run(PROG, main)


if __name__ == "__main__":
    run()
