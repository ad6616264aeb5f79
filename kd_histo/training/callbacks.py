"""Keras callbacks of the training loop that Keras does not ship.

``SaveBestNet`` keeps the best *network* (not the distiller wrapping it with a frozen teacher) by
a validation metric and remembers the best value across a resumed run; ``HistoryCSV`` appends
each epoch's logs (the run's active losses) to history.csv under the header the file already has;
``ImageGrids`` writes HR and LR sample grids to TensorBoard once; ``EpochCounter`` records how many
epochs finished, so a
failed start can be told from a failed run.

Not here: which callbacks a run uses (``kd_histo.training.train``).
"""

from __future__ import annotations

import csv
import json
import math
import os

import keras
import numpy as np
import tensorflow as tf

from kd_histo.atomic import replacing


class SaveBestNet(keras.callbacks.Callback):
    """Saves ``net`` to ``path`` whenever ``monitor`` improves; the best value survives restarts.

    An epoch with a non-finite training loss or validation metric is never saved, so the last good
    network survives a run that diverges.

    Args:
      net: the network to save (the distiller's student).
      path: a ``.keras`` file.
      monitor: a logged metric, e.g. "val_accuracy" (higher is better) or "val_loss" (lower).
    """

    def __init__(self, net: keras.Model, path: str, monitor: str):
        super().__init__()
        self.net, self.path, self.monitor = net, path, monitor
        self.higher = not monitor.endswith("loss")
        self.state_path = path + ".json"
        self.best = -math.inf if self.higher else math.inf
        if os.path.isfile(
            self.state_path
        ):  # a resumed run must not overwrite a better earlier epoch
            with open(self.state_path) as f:
                self.best = json.load(f)["best"]

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        value = logs.get(self.monitor)
        if value is None or not np.isfinite(value):
            return
        # An epoch whose training loss or any validation metric went NaN/inf has non-finite
        # weights or outputs; its val_accuracy can still be a finite, even "better", number.
        if not all_finite(logs):
            return
        if (value > self.best) if self.higher else (value < self.best):
            self.best = float(value)
            with replacing(self.path, ".tmp.keras") as tmp:
                self.net.save(tmp)  # a kill mid-save leaves the previous best intact
            with open(self.state_path, "w") as f:
                json.dump({"best": self.best, "epoch": int(epoch), "monitor": self.monitor}, f)


def all_finite(logs: dict) -> bool:
    """Whether an epoch's training loss and every validation metric are finite numbers."""
    return all(
        np.isfinite(value) for key, value in logs.items() if key == "loss" or key.startswith("val_")
    )


class TerminateOnNonFiniteVal(keras.callbacks.Callback):
    """Stops the run after an epoch whose validation metrics are NaN/inf (Keras' TerminateOnNaN
    looks at the training loss only, which can stay finite while the network's outputs are not).
    """

    def on_epoch_end(self, epoch, logs=None):
        if not all_finite(logs or {}):
            print(f"Epoch {epoch}: non-finite validation metrics, terminating training", flush=True)
            self.model.stop_training = True


class HistoryCSV(keras.callbacks.CSVLogger):
    """``CSVLogger(path, append=True)`` that keeps the columns of an existing file.

    The logs hold the total and the active losses only. A run resumed into a history.csv written
    with other columns (e.g. by a version that logged every loss) keeps that header: its rows
    fill the header's columns ("NA" where a value is missing), so no row shifts.
    """

    def __init__(self, path: str):
        super().__init__(path, append=True)

    def on_train_begin(self, logs=None):
        header = None
        if os.path.isfile(self.filename):
            with open(self.filename, newline="") as f:
                header = next(csv.reader(f), None)
        super().on_train_begin(logs)
        if header and header[0] == "epoch":
            self.keys = header[1:]


class ImageGrids(keras.callbacks.Callback):
    """Writes a grid of HR tiles and the matching LR tiles (upsampled for display) at start."""

    def __init__(self, batch: dict, log_dir: str, max_images: int = 8):
        super().__init__()
        self.batch, self.log_dir, self.max_images = batch, log_dir, max_images

    def on_train_begin(self, logs=None):
        hr = self.batch["hr"][: self.max_images]
        views = {"hr": hr}
        for key in ("lr",):
            if key in self.batch:
                views[key] = tf.image.resize(
                    self.batch[key][: self.max_images], tf.shape(hr)[1:3], method="nearest"
                )
        writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "train"))
        with writer.as_default():
            for key, images in views.items():
                tf.summary.image(
                    f"samples/{key}",
                    tf.clip_by_value(images, 0.0, 1.0),
                    step=0,
                    max_outputs=self.max_images,
                )
        writer.close()


class EpochCounter(keras.callbacks.Callback):
    """Counts finished epochs of this process."""

    def __init__(self):
        super().__init__()
        self.finished = 0

    def on_epoch_end(self, epoch, logs=None):
        self.finished += 1
