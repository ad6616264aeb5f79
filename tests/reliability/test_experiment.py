"""The experiment's refusals up front (issue 31, case 12): a factor whose LR tile is smaller than
the net's stride is refused before any run trains, not after the teacher and baseline."""

import os

import pytest

from kd_histo.cli import experiment as experiment_cli
from kd_histo.cli import flags_common as fc

from .helpers import TINY_FLAGS

pytestmark = pytest.mark.reliability


def test_a_factor_too_large_for_the_tile_is_refused_before_training(tiny_shards, tmp_path, capsys):
    out = tmp_path / "exp"
    argv = [
        f"--data_dir={tiny_shards}",
        f"--out_dir={out}",
        "--factors=2,16",  # 32 px tiles: x16 gives 2 px LR tiles, under the tiny net's stride
        "--unlabeled_fractions=0",
        "--n_boot=5",
        "--cost_batch_sizes=1",
        *TINY_FLAGS,
    ]
    code = fc.invoke(experiment_cli.PROG, experiment_cli.main, argv)
    err = capsys.readouterr().err.strip()
    assert code == fc.EXIT_BAD_INPUT
    assert err.startswith(f"{experiment_cli.PROG}: error:") and "\n" not in err, err
    assert "factor 16" in err and "stride" in err
    runs = out / "runs"
    trained = [p for p in runs.rglob("run.json")] if runs.exists() else []
    assert trained == []  # nothing was trained first
    assert not runs.exists() or not any(
        os.listdir(runs / d) for d in os.listdir(runs)
    )  # no run folder was even started
