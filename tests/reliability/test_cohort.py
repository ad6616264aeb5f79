"""kd-histo-predict on a cohort under failure (issue 29 Deliver 2, issue 31 cases 4 and 11): a
corrupt or unopenable slide is skipped and listed while the others finish; a full disk leaves no
truncated file under its final name; kill -9 at any point, then the same command, gives the same
bytes as an uninterrupted run, having skipped the finished slides; another model or other
settings into the same out_dir are refused; a second predict into a busy out_dir is refused in one
line naming the lock."""

import csv
import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from convert.pyramid_tiff import write_pyramid_tiff

from kd_histo.atomic import replacing
from kd_histo.cli import flags_common as fc
from kd_histo.cli import predict as predict_cli
from kd_histo.evaluation import qupath_out

from .helpers import CHILD_ENV
from .test_slides import _break_a_level0_tile

pytestmark = pytest.mark.reliability
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "predict_child.py")
COHORT = "kd_histo.evaluation.cohort"


def _slide(path, width: int, seed: int) -> str:
    """A ``256 x width`` px pyramidal TIFF at 0.25 µm/px, tissue-coloured on its left half."""
    img = np.full((256, width, 3), 245, np.uint8)
    half = width // 2
    img[:, :half] = np.random.default_rng(seed).integers(90, 200, (256, half, 3), dtype=np.uint8)
    img[:, :half, 1] //= 2
    write_pyramid_tiff(str(path), img, 0.25, levels=3)
    return str(path)


def _slides(folder, n: int = 3) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    return [_slide(folder / f"s{i}.tif", 256 + 64 * i, seed=i) for i in range(n)]


def _argv(run, inputs, out, *extra) -> list[str]:
    return [
        f"--model_dir={run}",
        f"--inputs={','.join(inputs)}",
        f"--out_dir={out}",
        "--read_mpp=0.5",
        "--num_workers=0",
        "--heatmap",
        *extra,
    ]


def _predict(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = fc.invoke(predict_cli.PROG, predict_cli.main, list(argv))
    return code, capsys.readouterr().err


def _tree(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path: bytes), lock files left out."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            if not n.startswith(".lock-"):
                out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


@pytest.fixture(scope="module")
def reference(teacher_run, tmp_path_factory):
    """Three slides and their uninterrupted prediction: (slides, {file: bytes})."""
    root = tmp_path_factory.mktemp("cohort_reference")
    slides = _slides(root / "slides")
    out = root / "pred"
    assert fc.invoke(predict_cli.PROG, predict_cli.main, _argv(teacher_run, slides, out)) == 0
    return slides, _tree(out)


def test_a_corrupt_and_an_unopenable_slide_are_skipped_and_the_others_finish(
    teacher_run, reference, tmp_path, capsys
):
    slides, _ = reference
    bad = _slide(tmp_path / "bad.tif", 320, seed=7)
    _break_a_level0_tile(bad)
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"not a slide at all" * 10)
    inputs = [slides[0], bad, str(junk), slides[1]]
    code, err = _predict(capsys, *_argv(teacher_run, inputs, tmp_path / "pred"))
    assert code == 0, err
    out = tmp_path / "pred"
    skipped = list(csv.DictReader(open(out / "skipped.csv")))
    assert [r["path"] for r in skipped] == [bad, str(junk)], skipped
    assert all(r["reason"] for r in skipped)
    ids = {r["slide_id"] for r in csv.DictReader(open(out / "predictions.csv"))}
    assert ids == {"s0", "s1"}
    assert (out / "s1.geojson").is_file() and not (out / "bad.geojson").exists()


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_leaves_no_truncated_file_and_the_rerun_finishes_the_same(
    teacher_run, reference, tmp_path, capsys, monkeypatch
):
    slides, want = reference
    out = tmp_path / "pred"
    calls = []

    def half_then_full(path, text, suffix=""):  # the 2nd slide's GeoJSON: the disk fills midway
        calls.append(path)
        if len(calls) < 2:
            return write_text(path, text, suffix)
        with replacing(path, suffix) as tmp, open(tmp, "w") as f:
            f.write(text[: len(text) // 2])
            f.flush()
            _enospc()

    write_text = qupath_out.write_text
    monkeypatch.setattr(qupath_out, "write_text", half_then_full)
    code, err = _predict(capsys, *_argv(teacher_run, slides, out))
    line = err.strip().splitlines()[-1]
    assert code == 2 and "the disk is full" in line and "finished work is kept" in line, err
    assert (out / "s0.geojson").read_bytes() == want["s0.geojson"]  # the finished slide is kept
    assert not (out / "s1.geojson").exists() and not (out / "predictions.csv").exists()
    assert not [p for p in _tree(out) if ".tmp-" in p]
    monkeypatch.setattr(qupath_out, "write_text", write_text)

    def copy_half_then_full(src, dst, *args):  # now the disk fills while predictions.csv is written
        dst.write(src.read()[:100])
        _enospc()

    monkeypatch.setattr("kd_histo.evaluation.cohort.shutil.copyfileobj", copy_half_then_full)
    code, err = _predict(capsys, *_argv(teacher_run, slides, out))
    assert code == 2 and "the disk is full" in err and "1 of 3 inputs already predicted" in err
    assert not (out / "predictions.csv").exists() and not [p for p in _tree(out) if ".tmp-" in p]
    monkeypatch.undo()
    code, err = _predict(capsys, *_argv(teacher_run, slides, out))
    assert code == 0 and "3 of 3 inputs already predicted" in err, err
    assert _tree(out) == want


def _wait_for(path, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"the child ended (rc {proc.returncode}) first:\n{err[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no {path} after {timeout}s")


def _start_child(tmp_path, hang: str, argv: list[str]) -> tuple[subprocess.Popen, str]:
    ready = str(tmp_path / "ready")
    proc = subprocess.Popen(
        [sys.executable, CHILD, ready, hang, "--", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    return proc, ready


@pytest.mark.parametrize(
    "hang",
    [
        f"{COHORT}:write_part,2",  # between the 2nd slide's GeoJSON/OME-TIFF/heatmap and parts
        f"{COHORT}:write_json,3",  # the 2nd slide's parts written, its done-marker not yet
        f"{COHORT}:shutil.copyfileobj,2,half",  # predictions.csv half written (a temporary file)
        "kd_histo.atomic:os.replace,3",  # s0's OME-TIFF written, not renamed (a temporary file)
    ],
    ids=["after_slide_files", "before_done_marker", "tables_half_written", "before_a_rename"],
)
def test_kill_9_at_any_point_then_rerun_gives_the_same_bytes(
    teacher_run, reference, tmp_path, capsys, hang
):
    slides, want = reference
    out = tmp_path / "pred"
    argv = _argv(teacher_run, slides, out)
    proc, ready = _start_child(tmp_path, hang, argv)
    try:
        _wait_for(ready, proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert _tree(out) != want  # the kill left the work unfinished
    assert any(".tmp-" in p for p in _tree(out)) == ("half" in hang or "replace" in hang)
    code, err = _predict(capsys, *argv)
    assert code == 0, err
    finished = {"copyfileobj": 3, "replace": 0}.get(hang.split(",")[0].split(".")[-1], 1)
    if finished:
        assert f"{finished} of 3 inputs already predicted" in err, err
    else:
        assert "already predicted" not in err, err
    assert _tree(out) == want


def test_another_model_or_other_settings_into_the_out_dir_are_refused(
    teacher_run, reference, runs_elsewhere, tmp_path, capsys
):
    slides, want = reference
    out = tmp_path / "pred"
    assert _predict(capsys, *_argv(teacher_run, slides, out))[0] == 0
    code, err = _predict(capsys, *_argv(teacher_run, slides, out, "--min_tissue=0.9"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "other settings" in err and "min_tissue" in err and "--out_dir" in err
    code, err = _predict(capsys, *_argv(runs_elsewhere, slides, out))
    assert code == 2 and "another model" in err and "model_sha256" in err, err
    assert _tree(out) == want  # nothing was touched


@pytest.fixture
def runs_elsewhere(teacher_run, tmp_path):
    """The teacher run with one weight changed: another model, the same record."""
    import shutil

    import keras

    copy = tmp_path / "other_run"
    shutil.copytree(teacher_run, copy)
    model = keras.saving.load_model(copy / "model.keras", compile=False)
    w = model.weights[0]
    w.assign(w.numpy() + 0.01)
    model.save(copy / "model.keras")
    return str(copy)


def test_a_second_predict_into_a_busy_out_dir_is_refused_naming_the_lock(
    teacher_run, reference, tmp_path, capsys
):
    slides, want = reference
    out = tmp_path / "pred"
    argv = _argv(teacher_run, slides, out)
    # the first writer stops in the 2nd slide's files (a place the code had before the lock)
    where = "kd_histo.evaluation.prediction_files:write_slide_files,2"
    proc, ready = _start_child(tmp_path, where, argv)
    try:
        _wait_for(ready, proc)
        code, err = _predict(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert str(out / ".lock-task-00000-of-00001") in err and f"pid {proc.pid}" in err, err
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    code, err = _predict(capsys, *argv)  # the dead writer's lock is taken over
    assert code == 0, err
    assert _tree(out) == want
