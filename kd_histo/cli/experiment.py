"""kd-histo-experiment: the paper's protocol on a converted data set, resumable, with a report.

    kd-histo-experiment --flagfile=flags/tiles/common.flags --data_dir=shards/lung \
        --unlabeled_dirs=shards/slides --out_dir=runs/lung --factors=2,4,8 \
        --unlabeled_fractions=0,0.25,0.5,1

The training flags (those of kd-histo-train: network, optimizer, epochs, distillation weights,
precision) set the template of every run; the experiment sets mode, run folder, factor, teacher
and unlabeled data per run, so --mode, --model_dir, --teacher and --factor are refused here.
Finished runs are skipped on a rerun. Writes <out_dir>/report/ (results.csv, results.md,
report.md, plots). Flags -> ``kd_histo.protocol.plan.ExperimentConfig`` -> ``run_experiment``.
"""

from __future__ import annotations

import shlex
import sys
from typing import TYPE_CHECKING

from kd_histo.cli import flags_common as fc
from kd_histo.cli import train as train_cli

if TYPE_CHECKING:  # the binary imports TensorFlow only once the flags are parsed
    from kd_histo.protocol.plan import ExperimentConfig

PROG = "kd-histo-experiment"
fc.define_experiment_flags()
FLAGS = fc.FLAGS
PER_RUN = ("mode", "model_dir", "teacher", "factor")


def config_from_flags() -> "ExperimentConfig":
    """The ExperimentConfig the flags describe."""
    import dataclasses

    from kd_histo.data.pipeline import unlabeled_pool_size
    from kd_histo.protocol.plan import ExperimentConfig

    given = [f"--{n}" for n in PER_RUN if FLAGS[n].present]
    if given:
        raise ValueError(
            f"{', '.join(given)} set per run by the experiment; drop them (they come from a "
            "single-run flagfile: use flags/<set>/common.flags)"
        )
    fc.require(data_dir=FLAGS.data_dir, out_dir=FLAGS.out_dir)
    base = train_cli.config_from_flags(mode="teacher", model_dir=FLAGS.out_dir)
    if FLAGS.unlabeled_fractions == ["auto"]:
        pool = unlabeled_pool_size(dataclasses.replace(base.data, unlabeled_ratio=0.0))
        fractions = (0.0, 0.25, 0.5, 1.0) if pool else (0.0,)
    else:
        fractions = fc.float_list(FLAGS.unlabeled_fractions, "unlabeled_fractions")
    return ExperimentConfig(
        out_dir=FLAGS.out_dir,
        base=base,
        factors=fc.float_list(FLAGS.factors, "factors"),
        unlabeled_fractions=fractions,
        seeds=fc.int_list(FLAGS.seeds, "seeds"),
        teacher_epochs=FLAGS.teacher_epochs,
        student_epochs=FLAGS.student_epochs,
        baseline_epochs=FLAGS.baseline_epochs,
        labeled_student_ce=FLAGS.labeled_student_ce,
        baselines=FLAGS.baselines,
        eval_split=FLAGS.eval_split,
        n_boot=FLAGS.n_boot,
        cost_batch_sizes=fc.int_list(FLAGS.cost_batch_sizes, "cost_batch_sizes"),
        cascade_fractions=fc.float_list(FLAGS.cascade_fractions, "cascade_fractions"),
        title=FLAGS.title,
    )


def main(argv: list[str]) -> None:
    del argv
    from kd_histo.protocol import experiment
    cfg = config_from_flags()
    paths = experiment.run_experiment(cfg, log=lambda line: print(f"{PROG}: {line}", flush=True))
    print(open(paths["md"]).read(), end="")
    print(f"{PROG}: report at {paths['report']}  (command: {shlex.join(sys.argv)})")


def run() -> None:
    fc.run(PROG, main)


if __name__ == "__main__":
    run()
