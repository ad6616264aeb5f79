"""The scale a run is used at (issue 31, case 9): a --read_mpp far from the run's µm/px, or finer
than the slide's scan, is said in one warning line; a run.json whose sizes contradict each other
(hr_px 64, input_px 32, factor 1) is refused by predict and evaluate in one line naming it."""

import json
import os
import shutil

import pytest

from kd_histo.cli import evaluate as evaluate_cli
from kd_histo.cli import flags_common as fc
from kd_histo.cli import predict as predict_cli

from .test_predict_inputs import _slide

pytestmark = pytest.mark.reliability


def _predict(capsys, run, out, *argv) -> tuple[int, str]:
    code = fc.invoke(
        predict_cli.PROG,
        predict_cli.main,
        [f"--model_dir={run}", f"--out_dir={out}", "--num_workers=0", *argv],
    )
    return code, capsys.readouterr().err.strip()


def _warnings(err: str, word: str) -> list[str]:
    return [line for line in err.splitlines() if word in line]


@pytest.mark.parametrize(
    "read_mpp, far, finer",
    [("0.0625", True, True), ("1.0", True, False), ("0.55", False, False)],
)
def test_read_mpp_far_from_the_run_or_finer_than_the_scan_warns(
    teacher_run, tmp_path, capsys, read_mpp, far, finer
):
    slide = _slide(tmp_path / "s.svs")  # 0.25 µm/px; the run's tiles are 0.5 µm/px
    out = tmp_path / "out"
    code, err = _predict(
        capsys, teacher_run, out, f"--inputs={slide}", f"--read_mpp={read_mpp}", "--max_tiles=4"
    )
    assert code == 0, err
    far_lines = _warnings(err, "trained at")
    assert len(far_lines) == (1 if far else 0), err
    if far:
        assert "--read_mpp" in far_lines[0] and "0.5" in far_lines[0], far_lines
    finer_lines = _warnings(err, "finer than")
    assert len(finer_lines) == (1 if finer else 0), err
    if finer:
        assert slide in finer_lines[0] and "0.25" in finer_lines[0], finer_lines


def _inconsistent(teacher_run, tmp_path) -> str:
    run = tmp_path / "run"
    shutil.copytree(teacher_run, run)
    record = json.loads((run / "run.json").read_text())
    assert record["view"] == "hr" and record["factor"] == 1.0
    record.update(hr_px=64, input_px=32)
    (run / "run.json").write_text(json.dumps(record))
    return str(run)


def test_an_inconsistent_run_json_is_refused_by_predict(teacher_run, tmp_path, capsys):
    run = _inconsistent(teacher_run, tmp_path)
    slide = _slide(tmp_path / "s.svs")
    code, err = _predict(capsys, run, tmp_path / "out", f"--inputs={slide}")
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith(f"{predict_cli.PROG}: error:"), err
    assert os.path.join(run, "run.json") in err and "input_px" in err, err
    assert not os.path.exists(tmp_path / "out" / "predictions.csv")


def test_an_inconsistent_run_json_is_refused_by_evaluate(
    teacher_run, tiny_shards, tmp_path, capsys
):
    run = _inconsistent(teacher_run, tmp_path)
    code = fc.invoke(
        evaluate_cli.PROG,
        evaluate_cli.main,
        [f"--model_dir={run}", f"--data_dir={tiny_shards}", f"--out_dir={tmp_path / 'ev'}"],
    )
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    last = err.splitlines()[-1]
    assert last.startswith(f"{evaluate_cli.PROG}: error:"), err
    assert os.path.join(run, "run.json") in last and "input_px" in last, err
