"""The training process that the reliability tests kill with SIGKILL (not a test module).

    python train_child.py <data_dir> <model_dir> <report.json> [<hang>]
    python train_child.py <config.json> <report.json> [<hang>]

The first form trains the tiny teacher of the reliability tests (3 epochs of 3 steps); the second
trains the ``RunConfig`` of ``config.json`` (``RunConfig.to_json``) and, at the end, also writes
every variable of the trained model and of its optimizer, in order, to ``<report.json>.npz``
(``model_0``, ... and ``optimizer_0``, ...). Both go through ``kd_histo.training.train.train``.

``<hang>`` is ``<epoch>,<batch>`` (stop for good after that batch, inside the epoch) or
``<epoch>,end`` (stop for good after the epoch's callbacks: its backup and history row are
written): there the process writes the optimizer's step count to the report as ``hang_step`` and
sleeps; the parent kills it. The report also holds the step count at the start (after any
restore) and at the end.
"""

from __future__ import annotations

import json
import os
import sys
import time

import keras
import numpy as np

from kd_histo.data.pipeline import PipelineConfig
from kd_histo.training import train
from kd_histo.training.config import NetConfig, RunConfig

EPOCHS, STEPS = 3, 3


class StepReport(keras.callbacks.Callback):
    """Writes the optimizer's step count at train start, at a hang point and at train end."""

    def __init__(self, path: str, hang: str, save_variables: bool = False):
        super().__init__()
        epoch, _, batch = hang.partition(",")
        self.hang_at = (int(epoch), batch if batch == "end" else int(batch)) if hang else None
        self.path, self.save_variables, self.state, self.epoch = path, save_variables, {}, 0

    def _steps(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def _write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f)
        os.replace(tmp, self.path)

    def _hang_if(self, point) -> None:
        if self.hang_at == (self.epoch, point):
            self.state["hang_step"] = self._steps()
            self._write()
            time.sleep(600)  # the parent kills this process here

    def on_train_begin(self, logs=None):
        self.state["start_step"] = self._steps()
        self._write()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._hang_if(batch)

    def on_epoch_end(self, epoch, logs=None):
        self._hang_if("end")

    def on_train_end(self, logs=None):
        if self.save_variables:
            arrays = {f"model_{i}": v.numpy() for i, v in enumerate(self.model.variables)}
            for i, v in enumerate(self.model.optimizer.variables):
                arrays[f"optimizer_{i}"] = v.numpy()
            np.savez(self.path + ".npz", **arrays)
        self.state["end_step"] = self._steps()
        self._write()


def tiny_teacher(data_dir: str, model_dir: str) -> RunConfig:
    return RunConfig(
        mode="teacher",
        model_dir=model_dir,
        data=PipelineConfig(data_dir, batch_size=4),
        net=NetConfig(planes=(4, 8, 8, 16), stem="small"),
        epochs=EPOCHS,
        steps_per_epoch=STEPS,
        val_steps=1,
        verbose=0,
        profile_steps=(0, 0),
        image_grids=False,
    )


def main(*args: str) -> None:
    if args[0].endswith(".json"):
        with open(args[0]) as f:
            cfg = RunConfig.from_json(f.read())
        report, hang, save = args[1], (args[2:] or [""])[0], True
    else:
        cfg = tiny_teacher(args[0], args[1])
        report, hang, save = args[2], (args[3:] or [""])[0], False
    train.train(cfg, extra_callbacks=[StepReport(report, hang, save)])


if __name__ == "__main__":
    main(*sys.argv[1:])
