"""Runs kd-histo binaries in-process on tiny data (shared by the CLI tests)."""

from __future__ import annotations

import shutil

from kd_histo.cli import cost as cost_cli
from kd_histo.cli import evaluate as evaluate_cli
from kd_histo.cli import flags_common as fc
from kd_histo.cli import predict as predict_cli
from kd_histo.cli import train as train_cli

BINARIES = {"train": train_cli, "evaluate": evaluate_cli, "cost": cost_cli, "predict": predict_cli}

# A net and schedule small enough for CI: planes 4-8-8-16, stride-8 stem, 2 epochs of 2 steps.
TINY = [
    "--planes=4,8,8,16",
    "--stem=small",
    "--batch_size=4",
    "--epochs=2",
    "--steps_per_epoch=2",
    "--val_steps=1",
    "--profile_steps=0,0",
    "--verbose=0",
]


def invoke(binary: str, *argv: str) -> int:
    """Exit code of ``kd-histo-<binary> argv`` run in this process."""
    module = BINARIES[binary]
    return fc.invoke(module.PROG, module.main, list(argv))


def train_run(data_dir, model_dir, mode: str, *extra: str) -> int:
    return invoke(
        "train",
        f"--mode={mode}",
        f"--data_dir={data_dir}",
        f"--model_dir={model_dir}",
        *TINY,
        *extra,
    )


def copy_data(src, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)
