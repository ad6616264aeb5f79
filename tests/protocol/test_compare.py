"""Paired comparisons across experiment folders (an ablation against the main run)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from support import REPO

from kd_histo.protocol.compare import RunRef, compare, markdown

N_TILES = 40


def _write_run(exp, seed, run, correct, train_s=None):
    """A run folder whose predictions.csv scores tile t correct iff correct[t]; labels all 1."""
    folder = exp / "runs" / f"s{seed}" / run / "eval_test"
    folder.mkdir(parents=True)
    lines = ["source,slide_id,x,y,label,pred,pred_name"]
    for t, ok in enumerate(correct):
        lines.append(f"tile{t}.png,group{t // 4},0,0,1,{1 if ok else 0},c")
    lines.append("pool.png,unl,0,0,-1,0,c")  # an unlabeled tile is not scored
    (folder / "predictions.csv").write_text("\n".join(lines) + "\n")
    if train_s is not None:
        state_path = exp / "state.json"
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        state[f"s{seed}/{run}"] = {"train_s": train_s}
        state_path.write_text(json.dumps(state))


def test_difference_is_paired_over_shared_seeds_and_tiles(tmp_path):
    rng = np.random.default_rng(0)
    main, abl = tmp_path / "main", tmp_path / "abl"
    a = rng.random((3, N_TILES)) < 0.9
    b = rng.random((3, N_TILES)) < 0.7
    for s in range(3):
        _write_run(abl, s, "student_x8", a[s], train_s=100.0 + s)
        _write_run(main, s, "baseline_x8", b[s], train_s=30.0)
    _write_run(main, 7, "baseline_x8", b[0])  # a seed the ablation lacks: left out
    row = compare(
        RunRef(str(abl), "student_x8"), RunRef(str(main), "baseline_x8"), label="x8", n_boot=500
    )
    assert row.difference.n_seeds == 3 and row.difference.n_tiles == N_TILES
    assert row.difference.mean == pytest.approx(a.mean() - b.mean())
    assert row.difference.per_seed == pytest.approx(tuple(a.mean(1) - b.mean(1)))
    assert row.difference.low <= row.difference.mean <= row.difference.high
    assert row.a_accuracy.mean == pytest.approx(a.mean()) and row.b_accuracy.sd == pytest.approx(
        np.std(b.mean(1), ddof=1)
    )
    assert (row.a_train_s, row.b_train_s) == (pytest.approx(101.0), 30.0)
    table = markdown([row])
    assert f"| x8 | {abl}:student_x8 | {main}:baseline_x8 | 3 |" in table
    assert f"{100 * (a.mean() - b.mean()):+.1f} [" in table and "| 101 / 30 |" in table


def test_unknown_runs_and_unpaired_seeds_are_clear_errors(tmp_path):
    _write_run(tmp_path / "main", 0, "baseline_x8", [True] * N_TILES)
    _write_run(tmp_path / "abl", 1, "student_x8", [True] * N_TILES)
    main, abl = str(tmp_path / "main"), str(tmp_path / "abl")
    with pytest.raises(ValueError, match="share no seed"):
        compare(RunRef(abl, "student_x8"), RunRef(main, "baseline_x8"))
    with pytest.raises(FileNotFoundError, match="no seed of this run was evaluated on test"):
        compare(RunRef(abl, "student_x4"), RunRef(main, "baseline_x8"))
    with pytest.raises(FileNotFoundError, match="not an experiment folder .* nor a results folder"):
        compare(RunRef(str(tmp_path / "nowhere"), "x"), RunRef(main, "baseline_x8"))
    with pytest.raises(ValueError, match="expected <experiment folder>:<run name>"):
        RunRef.parse("baseline_x8")


def test_tool_prints_and_writes_the_table(tmp_path):
    _write_run(tmp_path / "main", 0, "baseline_x8", [i % 2 == 0 for i in range(N_TILES)])
    _write_run(tmp_path / "abl", 0, "student_x8", [True] * N_TILES)
    out = tmp_path / "table.md"
    pair = f"{tmp_path / 'abl'}:student_x8,{tmp_path / 'main'}:baseline_x8,students 30 epochs, x8"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "compare_runs.py"),
            f"--pair={pair}",
            "--n_boot=200",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| students 30 epochs, x8 |" in proc.stdout and "+50.0 [" in proc.stdout
    assert out.read_text() in proc.stdout
    bad = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "compare_runs.py"), "--pair=only_one"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert bad.returncode == 2 and "compare_runs: error: --pair='only_one'" in bad.stderr
