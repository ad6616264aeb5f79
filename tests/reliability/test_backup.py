"""The end-of-epoch backup under damage (issue 31, case 10): a kill while it is written leaves the
previous one whole, a damaged newest backup falls back to the previous good one (or the run
restarts from epoch 0) with one line naming the file, and history.csv never repeats an epoch."""

import csv
import json
import os

import keras
import pytest

from kd_histo.training import train
from kd_histo.training.distiller import ResolutionDistiller

from .helpers import tiny_config

pytestmark = pytest.mark.reliability


class _Kill(Exception):
    pass


class _KillAfterEpoch(keras.callbacks.Callback):
    """Stops the run after epoch ``n`` ends (its backup and history row are written by then)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.n:
            raise _Kill()


def _cfg(data, tmp_path):
    return tiny_config(data, tmp_path / "run", epochs=3)


def _epochs(model_dir) -> list[int]:
    with open(os.path.join(model_dir, "history.csv")) as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def _newest_backup(model_dir) -> str:
    backup = os.path.join(model_dir, "backup")
    with open(os.path.join(backup, "training_metadata.json")) as f:
        return os.path.join(backup, json.load(f).get("weights", "latest.weights.h5"))


def _damage(path: str) -> None:
    """Overwrites bytes in the middle of the file, as a write cut short by a kill leaves it."""
    with open(path, "r+b") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(size // 3)
        f.write(b"\x00" * (size // 3))


def test_a_damaged_newest_backup_falls_back_to_the_previous_one(tiny_shards, tmp_path, caplog):
    cfg = _cfg(tiny_shards, tmp_path)
    with pytest.raises(_Kill):
        train.train(cfg, extra_callbacks=[_KillAfterEpoch(1)])
    newest = _newest_backup(cfg.model_dir)
    _damage(newest)
    caplog.clear()
    result = train.train(cfg)
    out = caplog.text
    line = [s for s in out.splitlines() if "backup" in s]
    assert len(line) == 1 and newest in line[0] and "previous good backup" in line[0], out
    assert result.epochs_run == 2  # epoch 1 runs again, from the backup of epoch 0
    assert _epochs(cfg.model_dir) == [0, 1, 2]  # no row repeated
    assert os.path.isfile(result.model_path)


def test_a_damaged_only_backup_restarts_cleanly_from_epoch_0(tiny_shards, tmp_path, caplog):
    cfg = _cfg(tiny_shards, tmp_path)
    with pytest.raises(_Kill):
        train.train(cfg, extra_callbacks=[_KillAfterEpoch(0)])
    newest = _newest_backup(cfg.model_dir)
    _damage(newest)
    caplog.clear()
    result = train.train(cfg)
    out = caplog.text
    assert newest in out and "restarting from epoch 0" in out, out
    assert result.epochs_run == 3
    assert _epochs(cfg.model_dir) == [0, 1, 2]


def test_a_kill_while_the_backup_is_written_leaves_the_previous_one_whole(
    tiny_shards, tmp_path, monkeypatch, caplog
):
    """The issue's kill -9 inside ``save_weights``: half a file written, then the process dies."""
    cfg = _cfg(tiny_shards, tmp_path)
    real = ResolutionDistiller.save_weights
    calls = []

    def dies_on_second_save(self, filepath, *args, **kwargs):
        calls.append(filepath)
        if len(calls) < 2:
            return real(self, filepath, *args, **kwargs)
        with open(filepath, "wb") as f:  # a partial HDF5 file under the name being written
            f.write(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
        raise _Kill()

    monkeypatch.setattr(ResolutionDistiller, "save_weights", dies_on_second_save)
    with pytest.raises(_Kill):
        train.train(cfg)
    monkeypatch.undo()
    caplog.clear()
    result = train.train(cfg)  # failed with "bad object header version number" before
    out = caplog.text
    assert "damaged" not in out  # nothing to fall back from: the newest whole backup is used
    assert result.epochs_run == 2
    assert _epochs(cfg.model_dir) == [0, 1, 2]


def test_a_damaged_backup_of_keras_own_layout_restarts_cleanly(tiny_shards, tmp_path, caplog):
    """A backup folder as Keras' BackupAndRestore (earlier versions) leaves it after a kill in
    the middle of writing latest.weights.h5: the metadata says epoch 1, the weights are cut."""
    cfg = _cfg(tiny_shards, tmp_path)
    with pytest.raises(_Kill):
        train.train(cfg, extra_callbacks=[_KillAfterEpoch(0)])
    backup = os.path.join(cfg.model_dir, "backup")
    for name in os.listdir(backup):
        os.remove(os.path.join(backup, name))
    legacy = os.path.join(backup, "latest.weights.h5")
    with open(legacy, "wb") as f:
        f.write(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    with open(os.path.join(backup, "training_metadata.json"), "w") as f:
        json.dump({"epoch": 1, "batch": 0}, f)
    caplog.clear()
    result = train.train(cfg)
    out = caplog.text
    assert legacy in out and "restarting from epoch 0" in out, out
    assert result.epochs_run == 3
    assert _epochs(cfg.model_dir) == [0, 1, 2]
