"""Ctrl-C (issue 31, case 17): SIGINT to the whole process group, as a terminal sends it, ends
kd-histo-train and kd-histo-convert with one line ("interrupted; rerun the same command to
resume") and exit status 130, never a traceback, and the rerun of the convert command finishes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from support import CONVERT

from .helpers import CHILD_ENV, write_class_tree

pytestmark = pytest.mark.reliability

TRAIN = [sys.executable, "-m", "kd_histo.cli.train"]
LINE = "interrupted; rerun the same command to resume"


def _ctrl_c(argv, ready, timeout=120) -> tuple[int, str]:
    """Starts ``argv`` in its own session, sends SIGINT to its group once ``ready()``; returns the
    exit status and stderr."""
    proc = subprocess.Popen(
        argv,
        env=CHILD_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.1)
        assert proc.poll() is None, "the command ended before it could be interrupted"
        assert ready(), "the command never got to work"
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err


def _assert_interrupted(code, err, prog):
    lines = [s for s in err.splitlines() if s.strip()]
    assert code == 130, err[-3000:]
    assert lines == [f"{prog}: {LINE}"], err[-3000:]


# Starts a TensorFlow process and trains: about 15 s on 2 busy cores.
@pytest.mark.large
def test_ctrl_c_in_train_is_one_line_and_exit_130(tiny_shards, tmp_path):
    model_dir = tmp_path / "run"
    argv = [
        *TRAIN,
        "--mode=teacher",
        f"--data_dir={tiny_shards}",
        f"--model_dir={model_dir}",
        "--planes=4,8,8,16",
        "--stem=small",
        "--batch_size=4",
        "--epochs=1000",
        "--steps_per_epoch=2",
        "--val_steps=1",
        "--profile_steps=0,0",
        "--verbose=0",
    ]

    def epochs_done():  # two rows: the first epoch has passed all its callbacks
        path = model_dir / "history.csv"
        return path.is_file() and len(path.read_text().splitlines()) >= 3

    code, err = _ctrl_c(argv, epochs_done)
    _assert_interrupted(code, err, "kd-histo-train")
    assert (model_dir / "backup").is_dir()  # what the rerun resumes from


# Spawned workers import TensorFlow: about 40 s on 2 busy cores.
@pytest.mark.large
@pytest.mark.parametrize("workers", [0, 2])
def test_ctrl_c_in_convert_is_one_line_and_exit_130_then_the_rerun_finishes(tmp_path, workers):
    src = tmp_path / "src"
    write_class_tree(src, 150, 32, seed=2000)
    out = tmp_path / "out"
    argv = [
        *CONVERT,
        f"--input_dir={src}",
        f"--out_dir={out}",
        "--tile_px=32",
        f"--num_workers={workers}",
        "--unit_size=4",
        "--progress=false",
    ]

    def units_done():
        parts = out / ".parts"
        return parts.is_dir() and sum(n.endswith(".json") for n in os.listdir(parts)) >= 2

    code, err = _ctrl_c(argv, units_done)
    _assert_interrupted(code, err, "kd-histo-convert")
    done = subprocess.run(argv, env=CHILD_ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    info = json.load(open(out / "dataset.json"))
    assert sum(sum(c.values()) for c in info["counts"].values()) == 300


@pytest.mark.parametrize("prog", ["kd-histo-train", "kd-histo-convert", "kd-histo-predict"])
def test_keyboard_interrupt_in_any_binary_is_one_line_and_exit_130(prog, capsys):
    from kd_histo.cli import flags_common as fc

    def main(argv):
        raise KeyboardInterrupt

    assert fc.invoke(prog, main, []) == 130
    captured = capsys.readouterr()
    assert captured.err == f"{prog}: {LINE}\n" and captured.out == ""
