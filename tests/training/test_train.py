"""kd_histo.training.train: one loop for three jobs, resume after a kill, precision restored, no
half-written runs."""

import csv
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from support import tiny_run_config

from kd_histo.data.pipeline import PipelineConfig
from kd_histo.training import train
from kd_histo.training.config import DistillConfig, OptimConfig, RunConfig

_cfg = tiny_run_config


class _Kill(Exception):
    """Stands in for the process dying (SIGKILL, preemption) at the end of an epoch."""


class _KillAfterEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch, self.weights = epoch, None

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.weights = [w.numpy().copy() for w in self.model.student.weights]
            raise _Kill()


class _WeightsAtStart(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.weights = [w.numpy().copy() for w in self.model.student.weights]


def _epochs(model_dir):
    return [int(r["epoch"]) for r in csv.DictReader(open(os.path.join(model_dir, "history.csv")))]


def test_killed_run_resumes_from_the_last_finished_epoch(tiny_shards, tmp_path):
    cfg = _cfg(tiny_shards, tmp_path / "run")
    kill = _KillAfterEpoch(0)
    with pytest.raises(_Kill):
        train.train(cfg, extra_callbacks=[kill])
    assert _epochs(cfg.model_dir) == [0]
    assert not os.path.exists(os.path.join(cfg.model_dir, "run.json"))  # not finished
    start = _WeightsAtStart()
    result = train.train(cfg, extra_callbacks=[start])
    assert _epochs(cfg.model_dir) == [0, 1, 2]  # epoch 0 not repeated, none lost
    assert result.epochs_run == 2
    for a, b in zip(kill.weights, start.weights):  # resumed from the killed run's weights
        np.testing.assert_array_equal(a, b)
    assert os.path.isfile(result.model_path)


def test_failed_start_leaves_no_run_folder(tiny_shards, tmp_path):
    cfg = _cfg(
        tiny_shards,
        tmp_path / "run",
        mode="distill",
        distill=DistillConfig(teacher=str(tmp_path / "no.keras")),
    )
    with pytest.raises(ValueError, match="teacher"):
        train.train(cfg)
    assert not (tmp_path / "run").exists()

    class _Boom(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            raise RuntimeError("boom before the first epoch")

    with pytest.raises(RuntimeError):
        train.train(_cfg(tiny_shards, tmp_path / "run2", epochs=1), extra_callbacks=[_Boom()])
    assert not (tmp_path / "run2").exists()  # created by this call, failed before an epoch finished


def test_precision_policy_is_restored_and_used(tiny_shards, tmp_path):
    seen = {}

    class _Policy(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen["global"] = keras.mixed_precision.global_policy().name
            seen["conv"] = self.model.student.get_layer("stem_conv").compute_dtype
            seen["var"] = self.model.student.get_layer("stem_conv").kernel.dtype
            raise _Kill()  # the policy is what this test is about: no need to train

    before = keras.mixed_precision.global_policy().name
    with pytest.raises(_Kill):
        train.train(
            _cfg(tiny_shards, tmp_path / "run", epochs=1, precision="mixed_bfloat16"),
            extra_callbacks=[_Policy()],
        )
    assert (
        seen["global"] == "mixed_bfloat16"
        and seen["conv"] == "bfloat16"
        and "float32" in str(seen["var"])
    )
    assert keras.mixed_precision.global_policy().name == before


def test_resume_refuses_other_settings(tiny_shards, tmp_path):
    cfg = _cfg(tiny_shards, tmp_path / "run", epochs=2)
    os.makedirs(cfg.model_dir)
    with open(
        os.path.join(cfg.model_dir, "config.json"), "w"
    ) as f:  # what an unfinished run leaves
        f.write(cfg.to_json())
    with pytest.raises(ValueError, match="other settings"):
        train.train(_cfg(tiny_shards, tmp_path / "run", epochs=2, seed=5))
    with pytest.raises(ValueError, match="--resume"):
        train.train(_cfg(tiny_shards, tmp_path / "run", epochs=2, resume=False))


def test_schedules_decay_the_learning_rate():
    cfg = RunConfig(mode="teacher", model_dir="x", data=PipelineConfig("d"), epochs=4)
    cos = train.make_optimizer(cfg, steps=10)  # 40 updates in all
    assert isinstance(cos, keras.optimizers.Adam) and cos.weight_decay == pytest.approx(1e-4)
    sched = cos._learning_rate
    assert float(sched(0)) == pytest.approx(1e-3)
    assert float(sched(20)) == pytest.approx(5e-4, rel=1e-3) and float(sched(40)) == pytest.approx(
        0.0, abs=1e-9
    )
    exp_cfg = RunConfig(
        mode="teacher",
        model_dir="x",
        data=PipelineConfig("d"),
        optim=OptimConfig(schedule="exponential", decay_rate=0.5),
    )
    assert float(train.make_optimizer(exp_cfg, 10)._learning_rate(20)) == pytest.approx(
        2.5e-4
    )  # 2 epochs


@pytest.mark.large
def test_sigkilled_binary_resumes(tiny_shards, tmp_path):
    """The real thing: SIGKILL the kd-histo-train process after its first epoch, run it again."""
    model_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "kd_histo.cli.train",
        "--mode=teacher",
        f"--data_dir={tiny_shards}",
        f"--model_dir={model_dir}",
        "--planes=4,8,8,16",
        "--stem=small",
        "--batch_size=4",
        "--epochs=40",
        "--steps_per_epoch=2",
        "--val_steps=1",
        "--profile_steps=0,0",
        "--verbose=0",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = model_dir / "history.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not (history.exists() and len(_epochs(model_dir)) >= 1):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _epochs(model_dir)
    assert 1 <= len(done) < 40
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    epochs = _epochs(model_dir)
    assert epochs == list(range(40)), "an epoch was lost or repeated"


def test_history_csv_keeps_the_header_of_a_resumed_file(tmp_path):
    """A run logged all five losses before; resumed, its rows still line up with that header."""
    from kd_histo.training.callbacks import HistoryCSV

    path = tmp_path / "history.csv"
    path.write_text(
        "epoch,accuracy,at_loss,ce_loss,feature_loss,kd_loss,loss,ssl_loss\n"
        "0,0.5,0.0,0.0,0.2,0.1,0.3,0.0\n"
    )
    cb = HistoryCSV(str(path))
    cb.on_train_begin()
    cb.on_epoch_end(1, {"accuracy": 0.6, "feature_loss": 0.4, "kd_loss": 0.2, "loss": 0.6})
    cb.on_train_end()
    rows = list(csv.DictReader(open(path)))
    assert rows[1] == {
        "epoch": "1",
        "accuracy": "0.6",
        "at_loss": "NA",
        "ce_loss": "NA",
        "feature_loss": "0.4",
        "kd_loss": "0.2",
        "loss": "0.6",
        "ssl_loss": "NA",
    }
    fresh = tmp_path / "new.csv"  # a new file: the logged (active) losses alone
    cb = HistoryCSV(str(fresh))
    cb.on_train_begin()
    cb.on_epoch_end(0, {"ce_loss": 1.0, "loss": 1.0})
    cb.on_train_end()
    assert fresh.read_text().splitlines()[0] == "epoch,ce_loss,loss,val_ce_loss,val_loss"
