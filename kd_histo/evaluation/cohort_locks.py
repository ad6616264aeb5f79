"""The locks of a cohort's out_dir, safe across machines (kd-histo-predict's job arrays).

``with held(folder, name):`` holds ``<folder>/.lock-<name>`` (``kd_histo.convert.writer.DirLock``:
pid and host inside; a second writer is refused in one line naming the file; a dead writer's lock
on this machine is taken over). A task of a job array restarted on another machine cannot ask
whether a pid of the old machine is alive, so while a lock is held a thread touches it every
:data:`HEARTBEAT_S` seconds, and a lock of another machine untouched for :data:`STALE_S` seconds
is a dead writer's: it is taken over, with a line naming it.

Not here: what the locks protect (``kd_histo.evaluation.cohort``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

_LOG = logging.getLogger(__name__)

TOOL = "kd-histo-predict"
HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten missed heartbeats: the writer (or its machine) is gone

_held: set[str] = set()  # the lock files this process holds, touched by the heartbeat thread
_guard = threading.Lock()
_beating: list[threading.Thread] = []


def _beat() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        with _guard:
            paths = list(_held)
        for p in paths:
            with contextlib.suppress(OSError):
                os.utime(p)


def _start_heartbeat() -> None:
    with _guard:
        if not _beating or not _beating[0].is_alive():
            _beating[:] = [threading.Thread(target=_beat, name="kd-histo-locks", daemon=True)]
            _beating[0].start()


def _take_over_if_silent(path: str) -> None:
    """Removes ``path`` if another machine's writer has not touched it for :data:`STALE_S`."""
    try:
        with open(path) as f:
            owner = json.load(f)
        silent = time.time() - os.path.getmtime(path)
    except (OSError, ValueError):
        return
    if owner.get("host") != socket.gethostname() and silent > STALE_S:
        _LOG.warning(
            f"taking over {path}: its writer (pid {owner.get('pid', '?')} on "
            f"{owner.get('host', '?')}) has not touched it for {silent:.0f} s"
        )
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def held(folder: str, name: str) -> Iterator[None]:
    """Holds ``<folder>/.lock-<name>`` for the block (module docstring)."""
    from kd_histo.convert.writer import DirLock

    lock = DirLock(folder, name, tool=TOOL)
    _take_over_if_silent(lock.path)
    with lock:
        with _guard:
            _held.add(lock.path)
        _start_heartbeat()
        try:
            yield
        finally:
            with _guard:
                _held.discard(lock.path)
