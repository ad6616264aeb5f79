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

import dataclasses
import shlex
import sys

from kd_histo.cli import flags_common as fc
from kd_histo.cli import train as train_cli
from kd_histo.data.pipeline import unlabeled_pool_size
from kd_histo.protocol.plan import ExperimentConfig

PROG = "kd-histo-experiment"
CONFIGS = (*train_cli.CONFIGS, ExperimentConfig)
OWN_FLAGS = train_cli.OWN_FLAGS
fc.define_config_flags(ExperimentConfig)
FLAGS = fc.FLAGS
PER_RUN = ("mode", "model_dir", "teacher", "factor")
AUTO_FRACTIONS = (0.0, 0.25, 0.5, 1.0)  # --unlabeled_fractions=auto with unlabeled data


def config_from_flags() -> ExperimentConfig:
    """The ExperimentConfig the flags describe."""
    given = [f"--{n}" for n in PER_RUN if FLAGS[n].present]
    if given:
        raise ValueError(
            f"{', '.join(given)} set per run by the experiment; drop them (they come from a "
            "single-run flagfile: use flags/<set>/common.flags)"
        )
    fc.require(
        data_dir=FLAGS.data_dir, out_dir=FLAGS.out_dir
    )  # before the run template's own checks
    base = train_cli.config_from_flags(mode="teacher", model_dir=FLAGS.out_dir)
    if FLAGS.unlabeled_fractions == ["auto"]:
        pool = unlabeled_pool_size(dataclasses.replace(base.data, unlabeled_ratio=0.0))
        fractions = AUTO_FRACTIONS if pool else (0.0,)
    else:
        fractions = fc.float_list(FLAGS.unlabeled_fractions, "unlabeled_fractions")
    return ExperimentConfig(
        **fc.config_kwargs(ExperimentConfig, base=base, unlabeled_fractions=fractions)
    )


def main(argv: list[str]) -> None:
    del argv
    from kd_histo.protocol import experiment

    cfg = config_from_flags()
    paths = experiment.run_experiment(cfg, log=fc.log)
    fc.print_file(paths["md"])
    print(f"{PROG}: report at {paths['report']}  (command: {shlex.join(sys.argv)})")


run = fc.entry_point(PROG, main)

if __name__ == "__main__":
    run()
