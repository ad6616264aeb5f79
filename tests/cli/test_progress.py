"""kd_histo/progress.py, the progress every binary's long loops report, and what a binary's log
shows of it.

Here, not beside a subpackage: the module is the binaries' shared console layer (as
``cli/flags_common``'s ``log_as`` is, whose lines it writes through) and sits at the bottom of the
package, where no test folder mirrors it; tests/ keeps no loose files at its top level.
"""

import io
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import kd_histo
from kd_histo import progress as P
from kd_histo.cli import flags_common as fc
from kd_histo.data import synthetic


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def said(caplog, monkeypatch):
    """The progress lines logged (the binaries show them as ``<prog>: <line>`` on stderr)."""
    monkeypatch.delenv(P.SWITCH, raising=False)
    caplog.set_level(logging.INFO, logger="kd_histo.progress")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "kd_histo.progress"]


def test_off_a_terminal_a_plain_line_every_interval_and_one_at_the_end(said, monkeypatch):
    stream = io.StringIO()  # not a terminal: nothing is drawn on it
    monkeypatch.setattr(P, "EVERY_S", 0.0)  # every update is due
    bar = P.progress(range(4), total=8, desc="tiles", unit="tiles", stream=stream, size=lambda i: 2)
    items = list(bar)
    assert items == [0, 1, 2, 3] and stream.getvalue() == ""
    lines = said()
    assert [line.split(" tiles (")[0] for line in lines] == [
        f"tiles: {n}/8" for n in (2, 4, 6, 8)
    ]  # the end's line is the last update's: not written twice
    assert all("\r" not in line and "\n" not in line for line in lines)
    assert lines[-1].startswith("tiles: 8/8 tiles (100%), ") and "tiles/s" in lines[-1]
    assert "elapsed, ETA 00:00" in lines[-1] and "(50%)" in lines[1]


def test_off_a_terminal_a_short_loop_says_only_its_end(said, monkeypatch):
    monkeypatch.setattr(P, "EVERY_S", 3600.0)
    with P.progress(total=5, desc="converting", unit="tiles", stream=io.StringIO()) as bar:
        bar.update(2)
        bar.update(3)
    assert len(said()) == 1 and said()[0].startswith("converting: 5/5 tiles (100%), ")
    # unknown total; leave=False (the caller prints its own summary): no last line
    for _ in P.progress(iter(range(3)), desc="slides", unit="slides", stream=io.StringIO()):
        pass
    assert said()[-1].startswith("slides: 3 slides, ") and "ETA" not in said()[-1]
    for _ in P.progress(range(3), desc="quiet", stream=io.StringIO(), leave=False):
        pass
    for _ in P.progress([], desc="unreadable", stream=io.StringIO()):  # nothing done: no line
        pass
    assert not any(line.startswith(("quiet", "unreadable")) for line in said())


def test_off_a_terminal_a_loop_cut_short_leaves_the_error_the_last_word(said, monkeypatch):
    monkeypatch.setattr(P, "EVERY_S", 3600.0)
    with pytest.raises(KeyboardInterrupt):
        with P.progress(total=5, desc="converting", stream=io.StringIO()) as bar:
            bar.update(2)
            raise KeyboardInterrupt
    with pytest.raises(ValueError):
        for i in P.progress(range(5), desc="evaluate", stream=io.StringIO()):
            if i == 2:
                raise ValueError("a corrupt record")
    assert said() == []


def test_a_slow_loop_says_seconds_per_item(said, monkeypatch):
    lines = P._Lines(10, "inputs", "slides")
    lines.start -= 40.0  # 2 slides in 40 s
    lines.n = 2
    assert lines.line(lines.start + 40.0) == (
        "inputs: 2/10 slides (20%), 20.0 s per slide, 00:40 elapsed, ETA 02:40"
    )


def test_on_a_terminal_a_tqdm_bar_redrawn_in_place(said):
    tty = FakeTerminal()
    with P.progress(total=10, desc="converting", unit="tiles", stream=tty) as bar:
        assert type(bar._backend).__module__.startswith("tqdm")
        for _ in range(10):
            bar.update(1)
    drawn = tty.getvalue()
    assert drawn.startswith("\rconverting:") and "10/10 [" in drawn and drawn.endswith("\n")
    assert said() == []  # nothing logged: the bar is the progress


def test_a_binary_note_on_a_terminal_clears_the_bar_and_redraws_it(said, monkeypatch):
    tty = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", tty)
    fc.log_as("kd-histo-x")
    with P.progress(total=4, desc="converting", unit="tiles") as bar:  # on sys.stderr
        bar.update(1)
        logging.getLogger("kd_histo.convert.x").warning("a note")
        bar.update(3)
    drawn = tty.getvalue()
    before, note, after = drawn.partition("kd-histo-x: a note\n")
    assert note and "0/4 [" in before and "4/4 [" in after
    assert before.endswith(" \r")  # the bar cleared first: the note starts its own line
    assert after.startswith("\rconverting:")  # redrawn below the note


def test_the_switch_turns_progress_off_and_the_loop_still_runs(said, monkeypatch):
    monkeypatch.setenv(P.SWITCH, "0")
    tty = FakeTerminal()
    assert list(P.progress(range(3), desc="x", stream=tty)) == [0, 1, 2]
    with P.progress(total=3, desc="y", stream=io.StringIO()) as bar:
        bar.update(3)
    assert tty.getvalue() == "" and said() == []
    monkeypatch.setenv(P.SWITCH, "1")
    assert list(P.progress(range(3), desc="z", stream=tty, show=False)) == [0, 1, 2]
    assert tty.getvalue() == "" and said() == []  # the caller's own switch (--noprogress)


def test_the_cascade_counts_every_tile_it_times(said, monkeypatch):
    """measure_curve's total (student and teacher over all tiles, the teacher over each share's
    tiles, each pass ``repeats`` times) is the count it reaches."""
    from kd_histo.evaluation import cascade

    monkeypatch.setattr(P, "EVERY_S", 3600.0)
    n, calls = 40, []
    probs = np.random.default_rng(0).dirichlet(np.ones(3), n)

    def net(x):
        calls.append(len(x))
        return probs[x[:, 0].astype(int)]

    idx = np.arange(n, dtype=float)[:, None]
    labels = np.zeros(n, int)
    cascade.measure_curve(
        net, net, idx, idx, labels, student_gflops=0.1, teacher_gflops=2.0,
        fractions=(0.0, 0.1, 0.5), batch_size=8, repeats=2,
    )  # fmt: skip
    # less the untimed warm-up batches: both nets (8 each), the 4 and the 20 tiles of 2 shares
    timed = sum(calls) - (8 + 8 + 4 + 8)
    assert timed == 2 * (n + n + 0 + 4 + 20)
    assert said() == [line for line in said() if line.startswith(f"cascade: {timed}/{timed} ")]
    assert len(said()) == 1


def test_convert_binary_log_has_progress_lines_and_no_carriage_return(tmp_path):
    """kd-histo-convert as a job array's task runs it: stderr into a file, not a terminal."""
    manifest = synthetic.write_tile_folder(str(tmp_path / "in"), 3, tile_px=16)
    log = tmp_path / "task.log"
    repo = os.path.dirname(os.path.dirname(kd_histo.__file__))
    env = {**os.environ, "PYTHONPATH": repo, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop(P.SWITCH, None)
    with open(log, "wb") as err:
        subprocess.run(
            [sys.executable, "-m", "kd_histo.cli.convert", f"--manifest={manifest}"]
            + [f"--out_dir={tmp_path / 'out'}", "--tile_px=16", "--num_workers=0", "--unit_size=4"],
            stderr=err,
            stdout=subprocess.DEVNULL,
            env=env,
            check=True,
            timeout=120,
        )
    text = log.read_bytes().decode()
    n = len(synthetic.CLASS_NAMES) * 3
    assert "\r" not in text
    assert any(
        line.startswith(f"kd-histo-convert: converting: {n}/{n} tiles (100%), ")
        and line.endswith("ETA 00:00")
        for line in text.splitlines()
    ), text


def test_predict_on_a_cohort_reports_each_input_and_the_cohort_without_carriage_return(
    runs, tiny_shards, tmp_path, capsys, monkeypatch
):
    """kd-histo-predict off a terminal (pytest's capture), every line due (EVERY_S = 0)."""
    from .cli_helpers import invoke

    monkeypatch.delenv(P.SWITCH, raising=False)
    monkeypatch.setattr(P, "EVERY_S", 0.0)
    tiles = tmp_path / "tiles"
    synthetic.write_tile_folder(str(tiles), 2, tile_px=32)  # a group of 2 tiles per class folder
    with open(os.path.join(tiny_shards, "dataset.json")) as f:
        n_test = sum(json.load(f)["counts"]["test"].values())
    argv = [f"--model_dir={runs / 'teacher'}", f"--out_dir={tmp_path / 'pred'}", "--batch_size=4"]
    assert invoke("predict", *argv, f"--inputs={tiny_shards},{tiles}") == 0
    said = capsys.readouterr()
    lines = said.err.splitlines()
    assert "\r" not in said.err + said.out
    assert f"kd-histo-predict: {tiny_shards} (test): 4/{n_test} tiles" in said.err  # per batch
    assert any(line.startswith("kd-histo-predict: tumour: 2 tiles, ") for line in lines)
    assert any(line.startswith("kd-histo-predict: inputs: 2/2 inputs (100%), ") for line in lines)


def test_evaluate_reports_its_split_in_tiles(runs, tiny_shards, tmp_path, capsys, monkeypatch):
    from .cli_helpers import invoke

    monkeypatch.delenv(P.SWITCH, raising=False)
    argv = [f"--model_dir={runs / 'teacher'}", f"--data_dir={tiny_shards}", "--n_boot=5"]
    assert invoke("evaluate", *argv, f"--out_dir={tmp_path / 'eval'}") == 0
    with open(os.path.join(tiny_shards, "dataset.json")) as f:
        n = sum(json.load(f)["counts"]["test"].values())
    err = capsys.readouterr().err
    assert f"kd-histo-evaluate: evaluate test: {n}/{n} tiles (100%), " in err and "\r" not in err


def test_the_teacher_cache_build_reports_its_tiles(runs, tiny_shards, tmp_path, capsys):
    from .cli_helpers import train_run

    argv = ["--factor=2", f"--teacher={runs / 'teacher'}", "--augment=flips", "--epochs=1"]
    cache = f"--teacher_cache={tmp_path / 'cache'}"
    assert train_run(tiny_shards, tmp_path / "student", "distill", *argv, cache) == 0
    err = capsys.readouterr().err
    done = re.findall(r"^kd-histo-train: teacher cache: (\d+)/(\d+) tiles \(100%\), ", err, re.M)
    assert done and all(n == total != "0" for n, total in done), err  # train's and val's caches
