"""Training under failure: NaN inputs, a missing or incompatible teacher, kill -9 inside an epoch,
a full disk or a read-only run folder.

Also proven elsewhere: tests/training/test_train.py
(``test_killed_run_resumes_from_the_last_finished_epoch``, an in-process stop;
``test_sigkilled_binary_resumes``, the binary over 40 epochs, marked large),
tests/cli/test_train_cli.py (``test_teacher_with_other_input_channels``, marked ``reliability``;
``test_teacher_with_other_class_count`` and ``test_read_only_model_dir``: the one-line CLI errors).
"""

import collections
import csv
import errno
import json
import math
import os
import signal
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_histo.models import build_model
from kd_histo.training import callbacks, preflight, train
from kd_histo.training.config import DistillConfig, RunConfig

from . import train_child
from .helpers import tiny_config, wait_for_report

pytestmark = pytest.mark.reliability


def _cfg(data_dir, model_dir, **kw) -> RunConfig:
    return tiny_config(data_dir, model_dir, **{"epochs": 3, **kw})


def _history(model_dir):
    with open(os.path.join(model_dir, "history.csv")) as f:
        return [(int(r["epoch"]), float(r["loss"])) for r in csv.DictReader(f)]


def _weights(path):
    return [w.numpy() for w in keras.saving.load_model(path, safe_mode=True).weights]


class _WeightsAfterEpoch(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = {}

    def on_epoch_end(self, epoch, logs=None):
        self.weights[epoch] = [w.numpy().copy() for w in self.model.student.weights]


def test_nan_inputs_stop_training_and_the_last_good_network_survives(
    tiny_shards, tmp_path, monkeypatch, capsys
):
    steps = 2
    real = train.training_stream

    def poisoned(cfg, split="train", **kw):  # NaN pixels from the second epoch on
        ds = real(cfg, split, **kw)

        def poison(i, batch):
            bad = i >= steps
            return {
                k: tf.where(bad, tf.fill(tf.shape(v), math.nan), v) if k in ("hr", "lr") else v
                for k, v in batch.items()
            }

        return ds.enumerate().map(poison)

    monkeypatch.setattr(train, "training_stream", poisoned)
    seen = _WeightsAfterEpoch()
    cfg = _cfg(tiny_shards, tmp_path / "run", steps_per_epoch=steps)
    train.train(cfg, extra_callbacks=[seen])
    assert "Batch 0: Invalid loss, terminating training" in capsys.readouterr().out
    history = _history(cfg.model_dir)
    assert [e for e, _ in history] == [0, 1]  # stopped in epoch 1 of 3
    assert np.isfinite(history[0][1]) and np.isnan(history[1][1])
    good = seen.weights[0]
    assert all(np.isfinite(w).all() for w in good)
    assert not all(np.isfinite(w).all() for w in seen.weights[1])  # the NaN reached the weights
    best = os.path.join(cfg.model_dir, "checkpoints", "best.keras")
    with open(best + ".json") as f:
        assert json.load(f)["epoch"] == 0
    for path in (best, os.path.join(cfg.model_dir, "model.keras")):
        for a, b in zip(_weights(path), good, strict=True):
            np.testing.assert_array_equal(a, b)
    with open(os.path.join(cfg.model_dir, "run.json")) as f:
        assert json.load(f)["diverged_at_epoch"] == 1


def test_nan_without_a_val_split_saves_no_model_and_says_so(
    tiny_shards_without, tmp_path, monkeypatch
):
    """No val split: no earlier network was kept, so the NaN net must not become model.keras."""
    data = tiny_shards_without("val")
    real = train.training_stream

    def all_nan(cfg, split="train", **kw):
        nan = {"hr", "lr"}
        return real(cfg, split, **kw).map(
            lambda b: {k: v * math.nan if k in nan else v for k, v in b.items()}
        )

    monkeypatch.setattr(train, "training_stream", all_nan)
    cfg = _cfg(data, tmp_path / "run", allow_no_val=True)
    with pytest.raises(
        train.TrainingError,
        match=r"diverged: .* NaN/inf in epoch 0 and no earlier network was kept",
    ):
        train.train(cfg)
    assert not os.path.exists(os.path.join(cfg.model_dir, "model.keras"))
    assert not os.path.exists(os.path.join(cfg.model_dir, "run.json"))


def test_an_epoch_with_a_nan_loss_is_never_saved_as_the_best(tmp_path):
    net = build_model("resnet_gn", 2, mean=[0.5] * 3, std=[0.25] * 3, planes=(4, 8, 8, 16))
    path = str(tmp_path / "best.keras")
    saver = callbacks.SaveBestNet(net, path, "val_accuracy")
    saver.on_epoch_end(0, {"loss": 1.3, "val_accuracy": 0.5})
    before = os.path.getmtime(path)
    # NaN weights predict one class: on a skewed val split that can look "better"
    saver.on_epoch_end(1, {"loss": math.nan, "val_accuracy": 0.9})
    saver.on_epoch_end(2, {"loss": math.inf, "val_accuracy": 0.95})
    assert os.path.getmtime(path) == before
    with open(path + ".json") as f:
        assert json.load(f) == {"best": 0.5, "epoch": 0, "monitor": "val_accuracy"}


def _save(net, path):
    net.save(path)
    return path


def _kd_net(classes, tmp_path, name):
    net = build_model("resnet_gn", classes, mean=[0.5] * 3, std=[0.25] * 3, planes=(4, 8, 8, 16))
    return _save(net, str(tmp_path / name))


def _teacher_case(case, tmp_path):
    """(teacher flag value, the PreflightError text expected)."""
    if case == "missing_file":
        p = str(tmp_path / "nowhere.keras")
        return p, f"teacher: model file {p} not found: train it first or fix the path"
    if case == "run_folder_without_model":
        (tmp_path / "teacher_run").mkdir()
        p = str(tmp_path / "teacher_run" / "model.keras")
        return str(
            tmp_path / "teacher_run"
        ), f"teacher: model file {p} not found: train it first or fix the path"
    if case == "not_a_keras_file":
        p = str(tmp_path / "teacher.h5")
        open(p, "wb").write(b"\x89HDF\r\n\x1a\n")
        return p, f"teacher: {p} is not a .keras file; save nets with model.save('<name>.keras')"
    if case == "damaged":
        p = _kd_net(4, tmp_path, "cut.keras")
        data = open(p, "rb").read()
        open(p, "wb").write(data[: len(data) // 2])
        return p, (
            f"teacher: {p} is damaged or not a Keras model (a .keras file is a zip archive); "
            "give a model.keras written by kd-histo-train"
        )
    if case == "zip_without_model":
        p = str(tmp_path / "empty.keras")
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("notes.txt", "not a model")
        return p, (
            f"teacher: {p} is not a loadable Keras model (KeyError: There is no item named "
            "'config.json' in the archive); give a model.keras written by kd-histo-train"
        )
    if case == "not_a_kd_histo_net":
        net = keras.Sequential(
            [
                keras.Input((None, None, 3)),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(4),
            ]
        )
        p = _save(net, str(tmp_path / "plain.keras"))
        return (
            p,
            f"teacher: {p}: not a kd_histo net (outputs must be a dict of 'logits' and 'features')",
        )
    if case == "other_class_count":
        p = _kd_net(3, tmp_path, "three.keras")
        return p, (
            f"teacher: {p}: the net has 3 classes but the data set has 4; "
            "use a model trained on the same class list"
        )
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing_file",
        "run_folder_without_model",
        "not_a_keras_file",
        "damaged",
        "zip_without_model",
        "not_a_kd_histo_net",
        "other_class_count",
    ],
)
def test_missing_or_incompatible_teacher_is_refused_before_anything_is_written(
    tiny_shards, tmp_path, case
):
    teacher, message = _teacher_case(case, tmp_path)
    cfg = _cfg(
        tiny_shards, tmp_path / "run", mode="distill", distill=DistillConfig(teacher=teacher)
    )
    with pytest.raises(preflight.PreflightError) as err:
        train.train(cfg)
    assert str(err.value) == message
    assert not (tmp_path / "run").exists()


def test_kill_9_inside_an_epoch_then_resume_loses_no_epoch_and_ends_at_the_same_step(
    tiny_shards, tmp_path
):
    model_dir, report = str(tmp_path / "run"), str(tmp_path / "report.json")
    cmd = [sys.executable, train_child.__file__, tiny_shards, model_dir, report]
    epochs, steps = train_child.EPOCHS, train_child.STEPS
    proc = subprocess.Popen(
        [*cmd, "1,1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        state = wait_for_report(report, "hang_step", proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert state == {"start_step": 0, "hang_step": steps + 2}  # 2 of 3 steps into epoch 1
    assert [e for e, _ in _history(model_dir)] == [0]
    assert not os.path.exists(os.path.join(model_dir, "run.json"))
    os.remove(report)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # a fresh process
    assert done.returncode == 0, done.stderr[-3000:]
    with open(report) as f:
        state = json.load(f)
    # Restored from the backup of epoch 0; the 2 steps of the killed epoch are redone, once.
    assert state == {"start_step": steps, "end_step": epochs * steps}
    assert [e for e, _ in _history(model_dir)] == list(range(epochs))
    with open(os.path.join(model_dir, "run.json")) as f:
        assert json.load(f)["epochs_run_this_process"] == epochs - 1


_Usage = collections.namedtuple("_Usage", "total used free")


def _probe_fails(code):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize(
    "case", ["disk_full", "no_space_on_write", "read_only", "under_a_file", "is_a_file"]
)
def test_unusable_model_dir_is_refused_before_training(tiny_shards, tmp_path, monkeypatch, case):
    parent = str(tmp_path / "runs")
    os.mkdir(parent)
    model_dir = os.path.join(parent, "run")
    if case == "disk_full":
        monkeypatch.setattr(
            preflight.shutil, "disk_usage", lambda p: _Usage(2**40, 2**40 - 10 * 2**20, 10 * 2**20)
        )
        message = f"only 10 MB free under {parent} (need {preflight.MIN_FREE_MB}); free disk space"
    elif case == "no_space_on_write":  # the probe write is what a full disk (or quota) refuses
        monkeypatch.setattr(preflight.tempfile, "NamedTemporaryFile", _probe_fails(errno.ENOSPC))
        message = (
            f"cannot write into {parent} (No space left on device); choose another --model_dir"
        )
    elif case == "read_only":  # a read-only mount refuses even root, which chmod does not
        monkeypatch.setattr(preflight.tempfile, "NamedTemporaryFile", _probe_fails(errno.EROFS))
        message = f"cannot write into {parent} (Read-only file system); choose another --model_dir"
    elif case == "under_a_file":
        open(os.path.join(parent, "notes"), "w").close()
        model_dir = os.path.join(parent, "notes", "run")
        message = (
            f"model_dir {model_dir} lies under {os.path.join(parent, 'notes')}, which is a file; "
            "choose another --model_dir"
        )
    else:
        open(model_dir, "w").close()
        message = f"model_dir {model_dir} is a file; pass a folder path"
    before = sorted(os.listdir(parent))
    with pytest.raises(preflight.PreflightError) as err:
        train.train(_cfg(tiny_shards, model_dir))
    assert str(err.value) == message
    assert sorted(os.listdir(parent)) == before  # nothing written
