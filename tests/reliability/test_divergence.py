"""A diverging run (issue 31, case 1): it ends with exit status 1 and one line saying so, a
checkpoint counts as "best" only with finite validation metrics (no NaN network is ever kept as the
best), and kd-histo-evaluate refuses a network with non-finite weights or outputs in one line."""

import json
import math
import os
import shutil

import keras
import numpy as np
import pytest

from kd_histo.cli import evaluate as evaluate_cli
from kd_histo.cli import flags_common as fc
from kd_histo.cli import train as train_cli
from kd_histo.models import build_model
from kd_histo.training import callbacks

from .helpers import TINY_FLAGS, last_error_line

pytestmark = pytest.mark.reliability


def test_a_run_whose_val_loss_is_nan_from_epoch_0_exits_1_and_keeps_no_model(
    tiny_shards, tmp_path, capsys
):
    """The issue's reproduction: lr 1e12 makes epoch 0's train loss finite (huge) but its val loss
    NaN; that epoch must not become the "best", and the run must not end as a success."""
    model_dir = tmp_path / "m"
    argv = ["--mode=teacher", f"--data_dir={tiny_shards}", f"--model_dir={model_dir}", *TINY_FLAGS]
    code = fc.invoke(
        train_cli.PROG,
        train_cli.main,
        [*argv, "--epochs=3", "--learning_rate=1e12", "--schedule=constant"],
    )
    out, err = capsys.readouterr()
    with open(model_dir / "history.csv") as f:
        first = f.read().splitlines()[1]
    assert "nan" in first  # the reproduction holds: epoch 0 already has a NaN val metric
    assert code == 1, (out, err)
    line = last_error_line(err, train_cli.PROG)
    assert "diverged" in line and "learning_rate" in line
    assert not (model_dir / "checkpoints" / "best.keras").exists()
    assert not (model_dir / "model.keras").exists()
    assert not (model_dir / "run.json").exists()


def test_a_run_that_diverges_after_a_good_epoch_keeps_it_but_exits_1(tiny_shards, tmp_path, capsys):
    """lr 1e6: epoch 0 finite, later epochs NaN; the finite epoch is kept as model.keras, with
    finite weights, and the exit status still says the run diverged."""
    model_dir = tmp_path / "m"
    argv = ["--mode=teacher", f"--data_dir={tiny_shards}", f"--model_dir={model_dir}", *TINY_FLAGS]
    code = fc.invoke(
        train_cli.PROG,
        train_cli.main,
        [*argv, "--epochs=3", "--learning_rate=1e6", "--schedule=constant"],
    )
    _, err = capsys.readouterr()
    assert code == 1
    line = last_error_line(err, train_cli.PROG)
    assert "diverged" in line and "epoch" in line
    assert err.count("diverged") == 1, err  # said once, in the error line
    net = keras.saving.load_model(str(model_dir / "model.keras"), safe_mode=True)
    assert all(np.isfinite(w.numpy()).all() for w in net.weights)
    with open(model_dir / "checkpoints" / "best.keras.json") as f:
        assert json.load(f)["epoch"] == 0
    with open(model_dir / "run.json") as f:
        assert json.load(f)["diverged_at_epoch"] is not None


def test_an_epoch_with_a_nan_val_metric_is_never_the_best(tmp_path):
    net = build_model("resnet_gn", 2, mean=[0.5] * 3, std=[0.25] * 3, planes=(4, 8, 8, 16))
    path = str(tmp_path / "best.keras")
    saver = callbacks.SaveBestNet(net, path, "val_accuracy")
    saver.on_epoch_end(0, {"loss": 1e20, "val_accuracy": 0.25, "val_loss": math.nan})
    assert not os.path.exists(path)
    saver.on_epoch_end(1, {"loss": 1.0, "val_accuracy": 0.2, "val_loss": 1.5})
    with open(path + ".json") as f:
        assert json.load(f) == {"best": 0.2, "epoch": 1, "monitor": "val_accuracy"}


def test_evaluate_refuses_a_network_with_nan_weights(teacher_run, tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(teacher_run, run)
    net = keras.saving.load_model(str(run / "model.keras"), safe_mode=True)
    for w in net.weights:
        w.assign(np.full(w.shape, np.nan, w.dtype))
    net.save(str(run / "model.keras"))
    code = fc.invoke(
        evaluate_cli.PROG,
        evaluate_cli.main,
        [f"--model_dir={run}", f"--data_dir={tiny_shards}", "--split=test"],
    )
    assert code == 2
    line = last_error_line(capsys.readouterr().err, evaluate_cli.PROG)
    assert "model.keras" in line and "weight tensors hold NaN" in line
    assert not (run / "eval_test").exists()


def test_evaluate_refuses_a_network_whose_outputs_are_not_finite(
    teacher_run, tiny_shards, tmp_path, capsys
):
    """Finite weights can still overflow: a final layer scaled to 1e38 gives inf logits."""
    run = tmp_path / "run"
    shutil.copytree(teacher_run, run)
    net = keras.saving.load_model(str(run / "model.keras"), safe_mode=True)
    kernel = [w for w in net.weights if len(w.shape) == 2][-1]  # the classifier's kernel
    kernel.assign(np.sign(kernel.numpy()) * 3e38)
    net.save(str(run / "model.keras"))
    code = fc.invoke(
        evaluate_cli.PROG,
        evaluate_cli.main,
        [f"--model_dir={run}", f"--data_dir={tiny_shards}", "--split=test"],
    )
    assert code == 2
    line = last_error_line(capsys.readouterr().err, evaluate_cli.PROG)
    assert "model.keras" in line and "outputs NaN/inf" in line
    assert not (run / "eval_test").exists()
