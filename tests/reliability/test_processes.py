"""Processes that share a folder or die: two trainings into one run folder, and kill -9 of a
conversion with worker processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from support import CONVERT

from kd_histo.cli import flags_common as fc
from kd_histo.cli import train as train_cli

from .helpers import CHILD_ENV, TINY_FLAGS, write_class_tree

pytestmark = pytest.mark.reliability


def _lock(model_dir, pid):
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, ".lock-train"), "w") as f:
        json.dump({"pid": pid, "host": socket.gethostname(), "time": time.time()}, f)


def test_a_second_training_into_a_locked_run_folder_is_refused(tiny_shards, tmp_path, capsys):
    model_dir = tmp_path / "run"
    argv = ["--mode=teacher", f"--data_dir={tiny_shards}", f"--model_dir={model_dir}", *TINY_FLAGS]
    holder = subprocess.Popen(["sleep", "60"])  # a live process "training" into the folder
    try:
        _lock(model_dir, holder.pid)
        assert fc.invoke(train_cli.PROG, train_cli.main, argv) == 2
        err = capsys.readouterr().err.strip()
        assert (
            err.startswith("kd-histo-train: error: another kd-histo-train") and "\n" not in err
        ), err
        assert str(holder.pid) in err
        assert sorted(os.listdir(model_dir)) == [".lock-train"]  # the other run's folder untouched
    finally:
        holder.kill()
        holder.wait()
    # its owner is dead now: the stale lock does not block, and the same command trains
    assert fc.invoke(train_cli.PROG, train_cli.main, argv) == 0, capsys.readouterr().err
    assert (model_dir / "run.json").is_file() and not (model_dir / ".lock-train").exists()
    with open(model_dir / "history.csv") as f:
        assert sum(line.startswith("epoch,") for line in f) == 1  # one header: one writer


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (from /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(name))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.large  # spawned workers import TensorFlow: about 45 s on 2 busy cores
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_convert_takes_its_workers_with_it(tmp_path):
    src = tmp_path / "src"
    write_class_tree(src, 40, 32, seed=1000)
    out = tmp_path / "out"
    argv = [
        *CONVERT,
        f"--input_dir={src}",
        f"--out_dir={out}",
        "--tile_px=32",
        "--num_workers=2",
        "--unit_size=1",
        "--progress=false",
    ]
    proc = subprocess.Popen(
        argv, env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 90
        workers = []
        while time.time() < deadline and len(workers) < 2:  # the pool is up and working
            workers = _children(proc.pid)
            time.sleep(0.2)
        assert len(workers) >= 2, "the conversion never started its workers"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 20
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        left = [w for w in workers if _alive(w)]
    finally:
        for w in _children(proc.pid) + workers:
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not left, f"worker processes {left} outlived their killed parent"
    # the same command afterwards resumes and completes
    done = subprocess.run(argv, env=CHILD_ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.load(open(out / "dataset.json"))
    assert sum(sum(c.values()) for c in info["counts"].values()) == 80
