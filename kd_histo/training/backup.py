"""The run's end-of-epoch backup, written atomically, with a fallback when the newest is damaged.

Keras' ``BackupAndRestore`` overwrites ``backup/latest.weights.h5`` in place: a kill -9 while it
writes left a file that every rerun failed to open ("bad object header version number"), naming
no file. ``AtomicBackupAndRestore`` writes each epoch's weights under a new name
(``epoch-<E>.weights.h5``, through a temporary file and a rename), then the metadata
(``training_metadata.json``: the epoch to resume at, that file, its SHA-256 and the previous
backup) atomically, and only then deletes older weights. A kill at any point leaves metadata
naming a whole file.

``prepare(backup_dir, log)`` runs before training: it checks the newest backup (checksum; an older
Keras backup without one must open as HDF5 and read back whole), falls back to the previous good
one, or, with none, removes the backup so the run restarts from epoch 0, with one line naming
the damaged file. ``forget_epochs_from(model_dir, epoch)`` then drops history.csv rows and a best
checkpoint of the epochs that will run again, so history.csv never repeats an epoch.

Not here: which callbacks a run uses (``kd_histo.training.train``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable

import keras

from kd_histo.atomic import replacing, write_json

_LOG = logging.getLogger(__name__)

METADATA = "training_metadata.json"
LEGACY_WEIGHTS = "latest.weights.h5"  # Keras' own file name (backups of earlier versions)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _readable_hdf5(path: str) -> bool:
    """Whether ``path`` opens as HDF5 and every data set in it reads back."""
    import h5py

    def read(_, obj):
        if isinstance(obj, h5py.Dataset):
            obj[()]

    try:
        with h5py.File(path, "r") as f:
            f.visititems(read)
    except Exception:  # noqa: BLE001 - any failure means the file cannot be restored
        return False
    return True


def _damage(backup_dir: str, entry: dict) -> str:
    """Why the backup ``entry`` of the metadata cannot be restored ("" when it can)."""
    name = entry.get("weights", LEGACY_WEIGHTS)
    path = os.path.join(backup_dir, name)
    if os.path.basename(name) != name or not os.path.isfile(path):
        return f"{path} is missing"
    if "sha256" in entry:
        return "" if _sha256(path) == entry["sha256"] else f"{path} is damaged (checksum)"
    return "" if _readable_hdf5(path) else f"{path} is damaged (not readable HDF5)"


def prepare(backup_dir: str, log: Callable[[str], None]) -> int:
    """Leaves ``backup_dir`` holding a restorable backup (or none); returns its epoch (0: none).

    A damaged newest backup gives way to the previous one, else the folder is removed; either
    way ``log`` gets one line naming the damaged file.
    """
    meta_path = os.path.join(backup_dir, METADATA)
    if not os.path.isdir(backup_dir):
        return 0
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        entries = [meta, *([meta["previous"]] if meta.get("previous") else [])]
        epochs = [int(e["epoch"]) for e in entries]
    except FileNotFoundError:  # a kill before the first metadata: nothing was backed up
        shutil.rmtree(backup_dir, ignore_errors=True)
        return 0
    except (OSError, ValueError, KeyError, TypeError) as e:
        log(f"the backup {meta_path} is damaged ({type(e).__name__}); restarting from epoch 0")
        shutil.rmtree(backup_dir)
        return 0
    first = _damage(backup_dir, meta)
    if not first:
        return epochs[0]
    for entry, epoch in zip(entries[1:], epochs[1:]):
        if not _damage(backup_dir, entry):
            log(f"the backup {first}; resuming from the previous good backup (epoch {epoch})")
            write_json(meta_path, {**entry, "previous": None})
            return epoch
    log(f"the backup {first} and no earlier good backup exists; restarting from epoch 0")
    shutil.rmtree(backup_dir)
    return 0


def forget_epochs_from(model_dir: str, epoch: int) -> None:
    """Drops history.csv rows and the best checkpoint of epochs ``>= epoch`` (they run again)."""
    history = os.path.join(model_dir, "history.csv")
    if os.path.isfile(history):
        with open(history, newline="") as f:
            rows = list(csv.reader(f))
        keep = [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) < epoch]
        if len(keep) < len(rows) - 1:
            with replacing(history) as tmp, open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(rows[:1] + keep if keep or epoch else [])
    best = os.path.join(model_dir, "checkpoints", "best.keras")
    try:
        with open(best + ".json") as f:
            stale = int(json.load(f)["epoch"]) >= epoch
    except (OSError, ValueError, KeyError, TypeError):
        return
    if stale:
        for path in (best + ".json", best):
            if os.path.exists(path):
                os.remove(path)


def resume_point(model_dir: str) -> int:
    """:func:`prepare` on ``<model_dir>/backup`` (lines printed), then :func:`forget_epochs_from`
    its epoch; returns that epoch (0: the run starts afresh)."""
    epoch = prepare(os.path.join(model_dir, "backup"), _LOG.warning)
    forget_epochs_from(model_dir, epoch)
    return epoch


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` (per epoch) whose backup is written atomically and restored from the
    metadata's file; run :func:`prepare` on the folder first."""

    def __init__(self, backup_dir: str):
        super().__init__(backup_dir)
        self._meta_path = os.path.join(backup_dir, METADATA)

    def on_train_begin(self, logs=None):
        if not os.path.isfile(self._meta_path):
            return
        with open(self._meta_path) as f:
            meta = json.load(f)
        path = os.path.join(self.backup_dir, meta.get("weights", LEGACY_WEIGHTS))
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        try:
            self.model.load_weights(path)
        except Exception as e:  # noqa: BLE001 - one line naming the file, whatever Keras raised
            raise ValueError(
                f"{path}: the backup does not fit this run ({type(e).__name__}); train into a "
                "new --model_dir or delete that backup folder to restart from epoch 0"
            ) from None
        self.model._initial_epoch = int(meta["epoch"])

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        previous = None
        if os.path.isfile(self._meta_path):
            with open(self._meta_path) as f:
                previous = {**json.load(f), "previous": None}
        name = f"epoch-{self._current_epoch:05d}.weights.h5"
        path = os.path.join(self.backup_dir, name)
        with replacing(path, ".tmp.weights.h5") as tmp:  # Keras wants the .weights.h5 ending
            self.model.save_weights(tmp, overwrite=True)
        entry = {"epoch": self._current_epoch, "batch": 0, "weights": name}
        write_json(self._meta_path, {**entry, "sha256": _sha256(path), "previous": previous})
        keep = {name, (previous or {}).get("weights", LEGACY_WEIGHTS), METADATA}
        for other in os.listdir(self.backup_dir):
            if other not in keep:
                os.remove(os.path.join(self.backup_dir, other))
