"""kd-histo-experiment and kd-histo-demo: flags -> configs, refusals, the smoke demo end to end."""

import json

import pytest

from kd_histo.cli import demo as demo_cli
from kd_histo.cli import experiment as experiment_cli
from kd_histo.cli import flags_common as fc
from kd_histo.protocol import demo


def _experiment_config(*argv):
    fc.FLAGS.unparse_flags()
    try:
        fc.FLAGS(["kd-histo-experiment", *argv])
        return experiment_cli.config_from_flags()
    finally:
        fc.FLAGS.unparse_flags()


def test_experiment_flags_make_the_grid(tiny_shards, tmp_path):
    cfg = _experiment_config(
        f"--data_dir={tiny_shards}",
        f"--out_dir={tmp_path}",
        "--factors=2,4",
        "--seeds=0,1",
        "--epochs=3",
        "--temperature=2",
        "--nobaselines",
    )
    assert cfg.factors == (2.0, 4.0) and cfg.seeds == (0, 1) and not cfg.baselines
    assert cfg.base.epochs == 3 and cfg.base.distill.temperature == 2.0
    # tiny_shards has an unlabeled split, so "auto" gives the paper's fractions
    assert cfg.unlabeled_fractions == (0.0, 0.25, 0.5, 1.0)
    cfg = _experiment_config(
        f"--data_dir={tiny_shards}", f"--out_dir={tmp_path}", "--unlabeled_fractions=0,0.5"
    )
    assert cfg.unlabeled_fractions == (0.0, 0.5)


@pytest.mark.parametrize("flag", ["--mode=teacher", "--model_dir=x", "--teacher=t", "--factor=4"])
def test_experiment_refuses_per_run_flags(tiny_shards, tmp_path, flag, capsys):
    code = fc.invoke(experiment_cli.PROG, experiment_cli.main,
                     [f"--data_dir={tiny_shards}", f"--out_dir={tmp_path}", flag])  # fmt: skip
    assert code == fc.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "set per run by the experiment; drop them" in err[0], err
    assert not any(tmp_path.iterdir())


def test_experiment_needs_its_folders(capsys):
    assert fc.invoke(experiment_cli.PROG, experiment_cli.main, ["--out_dir=x"]) == fc.EXIT_BAD_INPUT
    assert "--data_dir is required" in capsys.readouterr().err


def test_smoke_demo_end_to_end_then_rerun(tmp_path, capsys):
    out = tmp_path / "demo"
    assert fc.invoke(demo_cli.PROG, demo_cli.main, [f"--out_dir={out}", "--smoke"]) == 0
    printed = capsys.readouterr().out
    assert "| model | input px | GFLOPs/image |" in printed and "| student_x2_unl100 |" in printed
    rows = json.loads((out / "report" / "results.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["teacher", "baseline_x2", "student_x2", "student_x2_unl100"]
    info = json.loads((out / "data" / "dataset.json").read_text())
    assert (
        info["counts"]["unlabeled"] == {"unlabeled": 8} and info["class_names"][0] == "lymphocytes"
    )
    # the tiles' µm/px reaches the run record: predict reads slides at the student's own 2 x 2 µm/px
    from kd_histo.training.run_record import read_run_record

    assert info["mpp"] == demo.DEMO_TILE_MPP
    assert (
        read_run_record(str(out / "runs" / "s0" / "student_x2")).input_mpp == 2 * demo.DEMO_TILE_MPP
    )
    for name in ("report.md", "accuracy_vs_gflops.png", "confusion_matrices.png", "results.csv"):
        assert (out / "report" / name).stat().st_size > 0
    # A rerun trains nothing and gives the same table.
    assert fc.invoke(demo_cli.PROG, demo_cli.main, [f"--out_dir={out}", "--smoke"]) == 0
    again = capsys.readouterr().err  # progress lines: "kd-histo-demo: ..." on stderr
    skipped = [line for line in again.splitlines() if "trained already, skipped" in line]
    assert len(skipped) == 4 and all(line.startswith("kd-histo-demo: [") for line in skipped)
    assert "converted already, skipped" in again
    assert (
        json.loads((out / "report" / "results.json").read_text())["rows"][2]["accuracy"]
        == rows[2]["accuracy"]
    )
