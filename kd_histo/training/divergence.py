"""What a finished run keeps when its training diverged (NaN/inf loss or validation metrics).

``diverged_epoch(model_dir)`` reads the first such epoch from history.csv (over every resumed
attempt); ``kept_network`` picks the network to save: the best checkpoint (which
``callbacks.SaveBestNet`` writes only for epochs with finite metrics) or the last network, and
refuses to save one with NaN/inf weights. ``kd-histo-train`` ends a diverged run with exit status 1.

Not here: the training loop (``kd_histo.training.train``).
"""

from __future__ import annotations

import csv
import json
import os

import keras
import tensorflow as tf


class TrainingError(ValueError):
    """A run ended without a network worth saving; the message says what to change."""


def diverged_epoch(model_dir: str) -> int | None:
    """First epoch (over all resumed attempts) whose training loss or a validation metric was
    NaN/inf, from history.csv ("NA" cells, a column this epoch did not log, are no divergence)."""
    path = os.path.join(model_dir, "history.csv")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        for row in csv.DictReader(f):
            values = [v for k, v in row.items() if k == "loss" or (k or "").startswith("val_")]
            if any(v.strip().lower() in ("nan", "inf", "-inf", "") for v in values if v != "NA"):
                return int(row["epoch"])
    return None


def finite(net: keras.Model) -> bool:
    """Whether every weight of ``net`` is a finite number."""
    return all(bool(tf.reduce_all(tf.math.is_finite(w))) for w in net.weights)


def kept_network(model_dir: str, net: keras.Model, has_val: bool):
    """``(network to save, its monitored value or None, first diverged epoch or None)``: the best
    checkpoint when there is one, else ``net``.

    Raises:
      TrainingError: the run diverged and no checkpoint with finite validation metrics was kept,
        or the network to save has NaN/inf weights.
    """
    best_path = os.path.join(model_dir, "checkpoints", "best.keras")
    diverged = diverged_epoch(model_dir)
    kept = has_val and os.path.isfile(best_path)
    if diverged is not None and not kept:
        why = "no epoch before it had finite val metrics" if has_val else "no val split"
        raise TrainingError(
            f"the training diverged: its loss or val metrics became NaN/inf in epoch {diverged} "
            f"and no earlier network was kept ({why}); nothing was saved as the model in "
            f"{model_dir}: lower --learning_rate or check the inputs, then train into a new "
            "--model_dir"
        )
    best = None
    if kept:
        with open(best_path + ".json") as f:
            best = json.load(f)["best"]
        net = keras.saving.load_model(best_path, safe_mode=True)
    if not finite(net):
        raise TrainingError(
            f"the network to save in {model_dir} has NaN/inf weights (the training diverged); "
            "nothing was saved as the model: lower --learning_rate, then train into a new "
            "--model_dir"
        )
    return net, best, diverged
