"""Resume is exact (issue 31, case 8): a training killed with SIGKILL and rerun ends with the same
weights (bitwise, optimizer state included) and the same history.csv as an uninterrupted run with
the same seed, for a teacher, an LR baseline and a student reading the teacher cache.

Each run is a fresh process (train_child.py); the rerun must really resume (its optimizer starts
at the killed run's backed-up step), so an equal end cannot come from training again from the
start.
"""

import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

from kd_histo.data.pipeline import PipelineConfig
from kd_histo.training import callbacks, train
from kd_histo.training.config import DistillConfig

from . import train_child
from .helpers import CHILD_ENV, tiny_config, wait_for_report

# Each case starts three to five TensorFlow processes: about 20-40 s on 2 busy cores.
pytestmark = [pytest.mark.reliability, pytest.mark.large]

EPOCHS, STEPS = 4, 2
KINDS = ("teacher", "baseline", "student")


def _config(kind: str, data_dir, model_dir, teacher_dir: str):
    """The run of ``kind``: 4 epochs of 2 steps, colour-jittered (teacher, baseline) or the
    cache's flips with half of each batch from the unlabeled pool (student)."""
    common = dict(epochs=EPOCHS, steps_per_epoch=STEPS, seed=3)
    if kind == "teacher":
        return tiny_config(data_dir, model_dir, **common)
    if kind == "baseline":
        data = PipelineConfig(str(data_dir), batch_size=4, factor=2.0)
        return tiny_config(data_dir, model_dir, mode="baseline", data=data, **common)
    data = PipelineConfig(
        str(data_dir), batch_size=4, factor=2.0, augment="flips", unlabeled_ratio=0.5
    )
    distill = DistillConfig(teacher=teacher_dir, teacher_cache="auto")
    return tiny_config(data_dir, model_dir, mode="distill", data=data, distill=distill, **common)


def _run(cfg, report: str, hang: str = "") -> dict:
    """Trains ``cfg`` in a child process; with ``hang`` kills it (SIGKILL) there. The report."""
    config = report + ".config.json"
    with open(config, "w") as f:
        f.write(cfg.to_json())
    cmd = [sys.executable, train_child.__file__, config, report]
    if not hang:
        done = subprocess.run(cmd, env=CHILD_ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return wait_for_report(report, "end_step", done)
    proc = subprocess.Popen(
        [*cmd, hang], env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        state = wait_for_report(report, "hang_step", proc, timeout=300)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    os.remove(report)
    return state


@pytest.fixture(scope="module")
def uninterrupted(tiny_shards, teacher_run, tmp_path_factory):
    """``uninterrupted(kind)``: (run folder, report) of the run of ``kind`` never killed."""
    runs = {}

    def get(kind: str):
        if kind not in runs:
            tmp = tmp_path_factory.mktemp(f"uninterrupted_{kind}")
            report = str(tmp / "report.json")
            _run(_config(kind, tiny_shards, tmp / "run", teacher_run), report)
            runs[kind] = (str(tmp / "run"), report)
        return runs[kind]

    return get


def _assert_same_end(model_dir: str, report: str, ref_dir: str, ref_report: str) -> None:
    with np.load(report + ".npz") as got, np.load(ref_report + ".npz") as want:
        assert sorted(got.files) == sorted(want.files)
        differ = [k for k in want.files if not np.array_equal(got[k], want[k])]
    assert not differ, f"{len(differ)} of {len(want.files)} variables differ, e.g. {differ[:5]}"
    with (
        open(os.path.join(model_dir, "history.csv")) as f,
        open(os.path.join(ref_dir, "history.csv")) as g,
    ):
        assert f.read() == g.read()
    kept = [keras.saving.load_model(os.path.join(d, "model.keras")) for d in (model_dir, ref_dir)]
    for a, b in zip(kept[0].weights, kept[1].weights, strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), a.path


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_killed_after_an_epoch_ends_as_the_uninterrupted_one(
    kind, tiny_shards, teacher_run, uninterrupted, tmp_path
):
    ref_dir, ref_report = uninterrupted(kind)
    cfg = _config(kind, tiny_shards, tmp_path / "run", teacher_run)
    report = str(tmp_path / "report.json")
    # Killed once epoch 1 has ended: its backup and history row are written.
    assert _run(cfg, report, hang="1,end")["hang_step"] == 2 * STEPS
    state = _run(cfg, report)  # the same command again, in a fresh process
    assert state == {"start_step": 2 * STEPS, "end_step": EPOCHS * STEPS}  # resumed at epoch 2
    _assert_same_end(cfg.model_dir, report, ref_dir, ref_report)


def test_a_teacher_killed_inside_an_epoch_ends_as_the_uninterrupted_one(
    tiny_shards, teacher_run, uninterrupted, tmp_path
):
    ref_dir, ref_report = uninterrupted("teacher")
    cfg = _config("teacher", tiny_shards, tmp_path / "run", teacher_run)
    report = str(tmp_path / "report.json")
    # Killed after the first batch of epoch 2: the rerun redoes epoch 2 from its start.
    assert _run(cfg, report, hang="2,0")["hang_step"] == 2 * STEPS + 1
    state = _run(cfg, report)
    assert state == {"start_step": 2 * STEPS, "end_step": EPOCHS * STEPS}
    _assert_same_end(cfg.model_dir, report, ref_dir, ref_report)


class _Killed(Exception):
    pass


class _EndState(keras.callbacks.Callback):
    """Every variable of the model and its optimizer at the end of training."""

    def on_train_end(self, logs=None):
        self.arrays = [v.numpy() for v in self.model.variables + self.model.optimizer.variables]


def test_a_kill_while_an_epochs_history_row_is_written_resumes_exactly(
    tiny_shards, tmp_path, monkeypatch
):
    """The backup is written last at an epoch's end: a kill before it (here: while history.csv
    gets the epoch's row) redoes the epoch; a backup written first would resume after an epoch
    that history.csv (or the best checkpoint) never recorded."""
    ref_end, end = _EndState(), _EndState()
    ref = tiny_config(tiny_shards, tmp_path / "ref", epochs=3, seed=3)
    train.train(ref, extra_callbacks=[ref_end])
    cfg = tiny_config(tiny_shards, tmp_path / "run", epochs=3, seed=3)
    real = callbacks.HistoryCSV.on_epoch_end

    def dies_in_epoch_1(self, epoch, logs=None):
        if epoch == 1:
            raise _Killed()
        real(self, epoch, logs)

    with monkeypatch.context() as m:
        m.setattr(callbacks.HistoryCSV, "on_epoch_end", dies_in_epoch_1)
        with pytest.raises(_Killed):
            train.train(cfg)
    assert train.train(cfg, extra_callbacks=[end]).epochs_run == 2  # epochs 1 and 2
    for a, b in zip(end.arrays, ref_end.arrays, strict=True):
        assert np.array_equal(a, b)
    with (
        open(os.path.join(cfg.model_dir, "history.csv")) as f,
        open(os.path.join(ref.model_dir, "history.csv")) as g,
    ):
        assert f.read() == g.read()
