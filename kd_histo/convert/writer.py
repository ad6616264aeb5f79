"""Crash-safe writing: lock files, atomic record files, balanced shards.

Every file is written under a temporary name in the same folder and renamed when complete, so a
reader or a rerun never sees half a file: after ``kill -9`` a rerun redoes only what has no
complete file, and (since records are produced deterministically) yields the same shards. A lock
file per task refuses a second concurrent writer of the same task into one folder; a lock left by
a dead process on this host is taken over.

This module knows nothing about images or splits: it moves serialized records.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable, Iterator

import tensorflow as tf

from kd_histo import schema
from kd_histo.atomic import replacing
from kd_histo.convert.errors import ConversionError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


OWNER_WAIT_S = 2.0  # how long a lock may stay empty: its taker creates it, then writes its owner


def _read_owner(path: str) -> dict | None:
    """The owner record of a lock file ({} if unreadable), or None if the lock is gone.

    A lock is created empty (``O_EXCL``) and its owner written just after: a reader in between
    waits up to ``OWNER_WAIT_S`` for the record rather than naming "pid ?" in its refusal.
    """
    deadline = time.monotonic() + OWNER_WAIT_S
    while True:
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                return {}
            time.sleep(0.01)


class DirLock:
    """``with DirLock(folder, name):`` holds ``<folder>/.lock-<name>`` or raises ConversionError.

    ``tool`` names the writer in the refusal (kd-histo-train locks its run folder the same way).
    """

    def __init__(self, folder: str, name: str, tool: str = "kd-histo-convert"):
        self.path = os.path.join(folder, f".lock-{name}")
        self.tool = tool

    def __enter__(self) -> DirLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _read_owner(self.path)
                if owner is None:  # released meanwhile: take it
                    continue
                if owner.get("host") == me["host"] and not _pid_alive(int(owner.get("pid", -1))):
                    os.remove(self.path)  # stale: its writer died (e.g. kill -9); resume
                    continue
                raise ConversionError(
                    f"another {self.tool} (pid {owner.get('pid', '?')} on "
                    f"{owner.get('host', '?')}) is writing "
                    f"{os.path.dirname(self.path)}; wait for it, "
                    f"or delete {self.path} if it is dead"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self
        raise ConversionError(f"could not take the lock {self.path}; delete it and rerun")

    def __exit__(self, *exc) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


def write_records_atomic(path: str, records: Iterable[bytes], compression: str = "") -> int:
    """Writes serialized records to ``path`` atomically; returns how many were written."""
    n = 0
    with replacing(path) as tmp:
        with tf.io.TFRecordWriter(
            tmp, options=tf.io.TFRecordOptions(compression_type=compression or None)
        ) as w:
            for rec in records:
                w.write(rec)
                n += 1
    return n


def read_records(path: str, compression: str = "") -> Iterator[bytes]:
    """Yields the serialized records of one TFRecord file."""
    ds = tf.data.TFRecordDataset(path, compression_type=compression or None)
    yield from ds.as_numpy_iterator()


def write_shards(
    out_dir: str,
    split: str,
    parts: list[str],
    total: int,
    num_shards: int,
    compression: str = "",
) -> list[str]:
    """Streams the records of ``parts`` (in order) into ``num_shards`` balanced shards.

    Shard k holds records ``[k*total//num_shards, (k+1)*total//num_shards)``, so sizes differ by at
    most one and one slide's tiles stay together.

    Raises:
      ConversionError: the parts hold a different number of records than ``total``.
    """
    num_shards = max(1, min(num_shards, total))
    stream = (rec for p in parts for rec in read_records(p))
    paths = []
    written = 0
    for k in range(num_shards):
        n_k = (k + 1) * total // num_shards - k * total // num_shards
        path = os.path.join(out_dir, schema.shard_name(split, k, num_shards, compression))
        got = write_records_atomic(path, _take(stream, n_k), compression)
        if got != n_k:
            raise ConversionError(
                f"part files of split {split} hold fewer records than recorded; "
                "rerun with --overwrite"
            )
        written += got
        paths.append(path)
    if next(stream, None) is not None:
        raise ConversionError(
            f"part files of split {split} hold more records than recorded; rerun with --overwrite"
        )
    return paths


def _take(it: Iterator[bytes], n: int) -> Iterator[bytes]:
    for _ in range(n):
        rec = next(it, None)
        if rec is None:
            return
        yield rec
