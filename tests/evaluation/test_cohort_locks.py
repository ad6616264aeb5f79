"""kd_histo.evaluation.cohort_locks: a lock of another machine's writer that has stopped touching
it is taken over; a live one, or a silent one of this machine's live writer, is not."""

import json
import logging
import os
import socket
import time

import pytest

from kd_histo.evaluation import cohort_locks


def _foreign_lock(folder, name, age_s: float, host: str = "other-node") -> str:
    path = folder / f".lock-{name}"
    path.write_text(json.dumps({"pid": 12345, "host": host, "time": time.time() - age_s}))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return str(path)


def test_a_silent_lock_of_another_machine_is_taken_over(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="kd_histo")
    path = _foreign_lock(tmp_path, "task-00003-of-00008", cohort_locks.STALE_S + 60)
    with cohort_locks.held(str(tmp_path), "task-00003-of-00008"):
        with open(path) as f:
            assert json.load(f)["host"] == socket.gethostname()
    assert not os.path.exists(path)
    assert any("taking over" in r.getMessage() and path in r.getMessage() for r in caplog.records)


def test_a_recent_lock_of_another_machine_is_refused_naming_it(tmp_path):
    path = _foreign_lock(tmp_path, "task-00000-of-00001", cohort_locks.HEARTBEAT_S)
    with pytest.raises(ValueError, match="other-node") as err:
        with cohort_locks.held(str(tmp_path), "task-00000-of-00001"):
            pass
    assert path in str(err.value) and os.path.exists(path)


def test_a_live_writer_of_this_machine_is_refused_however_old_its_lock(tmp_path):
    path = _foreign_lock(tmp_path, "tables", 10 * cohort_locks.STALE_S, host=socket.gethostname())
    with open(path, "w") as f:  # this process: alive
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
    old = time.time() - 10 * cohort_locks.STALE_S
    os.utime(path, (old, old))
    with pytest.raises(ValueError, match="is writing"):
        with cohort_locks.held(str(tmp_path), "tables"):
            pass


def test_the_heartbeat_touches_held_locks(tmp_path, monkeypatch):
    monkeypatch.setattr(cohort_locks, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(cohort_locks, "_beating", [])
    with cohort_locks.held(str(tmp_path), "x"):
        path = tmp_path / ".lock-x"
        old = time.time() - 1000
        os.utime(path, (old, old))
        deadline = time.time() + 5
        while os.path.getmtime(path) < old + 500 and time.time() < deadline:
            time.sleep(0.05)
        assert os.path.getmtime(path) > old + 500
    assert not path.exists()
