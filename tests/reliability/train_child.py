"""The training process that test_training.py kills with SIGKILL (not a test module).

    python train_child.py <data_dir> <model_dir> <report.json> [<epoch>,<batch>]

Trains the tiny teacher of the reliability tests (3 epochs of 3 steps) through
``kd_histo.training.train.train``. With ``<epoch>,<batch>`` it stops for good after that batch,
inside the
epoch, once it has written the optimizer's step count to the report: the parent kills it there.
The report also holds the step count at the start (after any restore) and at the end.
"""

from __future__ import annotations

import json
import os
import sys
import time

import keras

from kd_histo.data.pipeline import PipelineConfig
from kd_histo.training import train
from kd_histo.training.config import NetConfig, RunConfig

EPOCHS, STEPS = 3, 3


class StepReport(keras.callbacks.Callback):
    """Writes the optimizer's step count at train start, at a hang point and at train end."""

    def __init__(self, path: str, hang_at: tuple[int, int] | None):
        super().__init__()
        self.path, self.hang_at, self.state, self.epoch = path, hang_at, {}, 0

    def _steps(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def _write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f)
        os.replace(tmp, self.path)

    def on_train_begin(self, logs=None):
        self.state["start_step"] = self._steps()
        self._write()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.hang_at == (self.epoch, batch):
            self.state["hang_step"] = self._steps()
            self._write()
            time.sleep(600)  # the parent kills this process here, in the middle of the epoch

    def on_train_end(self, logs=None):
        self.state["end_step"] = self._steps()
        self._write()


def main(data_dir: str, model_dir: str, report: str, hang: str = "") -> None:
    cfg = RunConfig(
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
    hang_at = tuple(int(v) for v in hang.split(",")) if hang else None
    train.train(cfg, extra_callbacks=[StepReport(report, hang_at)])


if __name__ == "__main__":
    main(*sys.argv[1:])
