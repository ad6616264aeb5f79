"""kd-histo-train: trains a teacher, a low-resolution baseline, or a distilled student.

    kd-histo-train --flagfile=flags/demo/teacher.flags
    kd-histo-train --flagfile=flags/demo/student_x4.flags --teacher=runs/demo/teacher

Flags -> a frozen ``kd_histo.training.config.RunConfig`` -> ``kd_histo.training.train.train``. Bad
input ends in
one line, ``kd-histo-train: error: <what to fix>``, exit code 2, and nothing written; a run that
diverged (NaN/inf loss or val metrics) ends in one such line and exit code 1.
"""

from __future__ import annotations

import errno
import os

from absl import flags

from kd_histo.cli import flags_common as fc  # first: it sets TensorFlow's log level
from kd_histo.data.pipeline import PipelineConfig
from kd_histo.data.stain_norm import StainConfig
from kd_histo.models import NetConfig
from kd_histo.training.config import DistillConfig, OptimConfig, RunConfig, smoke

PROG = "kd-histo-train"
EXIT_DIVERGED = 1  # the run ran but diverged (bad input is 2)
# The configs whose fields are this binary's flags.
CONFIGS = (
    PipelineConfig,
    RunConfig,
    NetConfig,
    DistillConfig,
    OptimConfig,
    StainConfig,
)
OWN_FLAGS = ("smoke",)
fc.define_binary_flags(CONFIGS, OWN_FLAGS)
FLAGS = fc.FLAGS


def config_from_flags(
    mode: str | None = None, model_dir: str | None = None, fv: flags.FlagValues = FLAGS
) -> RunConfig:
    """The RunConfig the flags describe (``--smoke`` shrinks it).

    Args:
      mode: overrides --mode (kd-histo-experiment builds its run template this way).
      model_dir: overrides --model_dir.
      fv: the parsed flags (default this process's; kd-histo-demo parses its flagfile apart).
    """
    given = {k: v for k, v in (("mode", mode), ("model_dir", model_dir)) if v}
    run = fc.config_kwargs(RunConfig, fv, **given)  # first: --mode and --model_dir are required
    data = PipelineConfig(**fc.config_kwargs(PipelineConfig, fv, seed=run["seed"]))
    cfg = RunConfig(
        **run,
        data=data,
        net=NetConfig(**fc.config_kwargs(NetConfig, fv)),
        distill=DistillConfig(**fc.config_kwargs(DistillConfig, fv)),
        optim=OptimConfig(**fc.config_kwargs(OptimConfig, fv)),
        stain=StainConfig(**fc.config_kwargs(StainConfig, fv)),
    )
    return smoke(cfg) if fv.smoke else cfg


def config_from_flagfile(path: str, *argv: str) -> RunConfig:
    """The RunConfig of a flagfile and more ``--flags`` (later ones win), parsed apart from this
    process's flags (kd-histo-demo reads flags/demo/common.flags this way)."""
    fv = flags.FlagValues()
    fc.define_binary_flags(CONFIGS, OWN_FLAGS, fv)
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "flagfile not found", path)
    try:
        fv([PROG, f"--flagfile={path}", *argv])
    except flags.Error as e:
        raise ValueError(f"{path}: {e}") from None
    return config_from_flags(fv=fv)


def main(argv: list[str]) -> None:
    del argv
    from kd_histo.training import train

    cfg = config_from_flags()
    try:
        result = train.train(cfg)
    except train.TrainingError as e:  # a diverged run is a failed run, not bad input
        fc.fail(PROG, str(e), EXIT_DIVERGED)
    best = f", best {cfg.monitor} {result.best:.4f}" if result.best is not None else ""
    if result.diverged_at_epoch is not None:
        fc.fail(
            PROG,
            f"the training diverged in epoch {result.diverged_at_epoch} (NaN/inf loss or val "
            f"metrics); the best network before it{best} is kept at {result.model_path}: lower "
            "--learning_rate to train further",
            EXIT_DIVERGED,
        )
    print(f"{PROG}: {cfg.mode} trained for {cfg.epochs} epochs{best}; model at {result.model_path}")


run = fc.entry_point(PROG, main)

if __name__ == "__main__":
    run()
