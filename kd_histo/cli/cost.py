"""kd-histo-cost: FLOPs (from the TF graph), parameters, latency and memory of trained runs.

    kd-histo-cost --runs=runs/demo/teacher,runs/demo/baseline_x4,runs/demo/student_x4 \
        --out_dir=runs/demo/cost

The first run is the reference (the teacher): the table gives teacher FLOPs / run FLOPs, which is
near 4, 16, 64 for students at x2, x4, x8. Writes cost.json, cost.md and a TensorBoard trace of a
few training steps per run (``<out_dir>/trace/<name>``).
"""

from __future__ import annotations

from kd_histo.cli import flags_common as fc
from kd_histo.evaluation.cost import CostConfig

PROG = "kd-histo-cost"
CONFIGS = (CostConfig,)
fc.define_binary_flags(CONFIGS)


def main(argv: list[str]) -> None:
    del argv
    from kd_histo.evaluation import cost

    out = cost.cost_of_runs(CostConfig(**fc.config_kwargs(CostConfig)))
    fc.print_file(out["markdown"])
    print(f"{PROG}: written to {out['json']} and {out['markdown']}")


run = fc.entry_point(PROG, main)

if __name__ == "__main__":
    run()
