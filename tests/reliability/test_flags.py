"""Bad numbers in flags and the messages that point at flags: NaN/inf refused up front, a zero
batch size of kd-histo-cost, evaluate's tile-size error, and cost.json's unmeasured memory."""

import json
import math

import pytest
from support import write_tiny_shards

from kd_histo.cli import convert as convert_cli
from kd_histo.cli import cost as cost_cli
from kd_histo.cli import evaluate as evaluate_cli
from kd_histo.cli import experiment as experiment_cli
from kd_histo.cli import flags_common as fc
from kd_histo.cli import predict as predict_cli
from kd_histo.cli import train as train_cli
from kd_histo.data.pipeline import PipelineConfig
from kd_histo.evaluation import cost
from kd_histo.training.config import DistillConfig, OptimConfig

from .helpers import TINY_FLAGS

pytestmark = pytest.mark.reliability


def _one_line_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{prog}: error:") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    "flag",
    [
        "--learning_rate=nan",
        "--learning_rate=inf",
        "--weight_decay=nan",
        "--temperature=inf",
        "--factor=nan",
        "--ce_weight=-inf",
    ],
)
def test_train_refuses_non_finite_numbers(tiny_shards, tmp_path, capsys, flag):
    model_dir = tmp_path / "m"
    code = fc.invoke(
        train_cli.PROG,
        train_cli.main,
        [
            "--mode=baseline",
            f"--data_dir={tiny_shards}",
            f"--model_dir={model_dir}",
            *TINY_FLAGS,
            flag,
        ],
    )
    assert code == 2
    err = _one_line_error(capsys, train_cli.PROG)
    assert flag[2:].split("=")[0] in err and "finite" in err
    assert not model_dir.exists()  # refused before anything was written


@pytest.mark.parametrize(
    "prog_module,argv",
    [
        (convert_cli, ["--input_dir=nowhere", "--out_dir={tmp}/o", "--tile_mpp=nan"]),
        (
            convert_cli,
            ["--input_dir=nowhere", "--out_dir={tmp}/o", "--split_fractions=0.7,nan,0.15"],
        ),
        (
            predict_cli,
            ["--model_dir=nowhere", "--inputs=nowhere", "--out_dir={tmp}/o", "--min_tissue=nan"],
        ),
        (experiment_cli, ["--data_dir={data}", "--out_dir={tmp}/o", "--factors=2,inf"]),
    ],
    ids=["convert_tile_mpp", "convert_split_fractions", "predict_min_tissue", "experiment_factors"],
)
def test_other_binaries_refuse_non_finite_numbers(tiny_shards, tmp_path, capsys, prog_module, argv):
    code = fc.invoke(
        prog_module.PROG, prog_module.main, [a.format(tmp=tmp_path, data=tiny_shards) for a in argv]
    )
    assert code == 2
    assert "finite" in _one_line_error(capsys, prog_module.PROG)
    assert not (tmp_path / "o").exists()


def test_config_dataclasses_refuse_non_finite_numbers():
    for make in (
        lambda: OptimConfig(learning_rate=math.nan),
        lambda: DistillConfig(kd_weight=math.inf),
        lambda: PipelineConfig("d", factor=math.nan),
        lambda: OptimConfig(clipnorm=math.nan),
    ):
        with pytest.raises(ValueError, match="finite"):
            make()


def test_cost_refuses_a_zero_batch_size(teacher_run, tmp_path, capsys):
    out = tmp_path / "cost"
    code = fc.invoke(
        cost_cli.PROG,
        cost_cli.main,
        [f"--runs={teacher_run}", f"--out_dir={out}", "--batch_sizes=0", "--trace_steps=0"],
    )
    assert code == 2
    err = _one_line_error(capsys, cost_cli.PROG)
    assert "--batch_sizes" in err and "in user code" not in err
    assert not out.exists()


def test_evaluate_tile_size_error_names_a_flag_it_has(teacher_run, tmp_path, capsys):
    small = write_tiny_shards(tmp_path / "d16", tile_px=16, per_class=1, num_shards=1, unlabeled=0)
    code = fc.invoke(
        evaluate_cli.PROG,
        evaluate_cli.main,
        [
            f"--model_dir={teacher_run}",
            f"--data_dir={small}",
            f"--out_dir={tmp_path / 'e'}",
            "--n_boot=5",
        ],
    )
    assert code == 2
    err = _one_line_error(capsys, evaluate_cli.PROG)
    assert "16" in err and "32" in err
    named = {w[2:].split("=")[0].rstrip(";,.)") for w in err.split() if w.startswith("--")}
    evaluate_flags = {"model_dir", "data_dir", "split", "out_dir", "batch_size", "n_boot"}
    convert_flags = {"tile_px"}  # a fix with kd-histo-convert is fine when the message says so
    assert named <= evaluate_flags | (convert_flags if "kd-histo-convert" in err else set()), err
    assert "hr_px" not in err  # evaluate has no such flag


def test_cost_json_says_null_for_memory_it_did_not_measure(teacher_run, tmp_path):
    import tensorflow as tf

    out = cost.cost_of_runs(
        cost.CostConfig(
            runs=(teacher_run,),
            out_dir=str(tmp_path / "c"),
            batch_sizes=(1, 2),
            repeats=1,
            profile_steps=0,
        )
    )
    rows = json.load(open(out["json"]))["rows"]
    timings = rows[0]["timings"]
    assert [t["batch_size"] for t in timings] == [1, 2]
    if not tf.config.list_logical_devices("GPU"):
        assert all(t["peak_memory_mb"] is None for t in timings)
        assert "n/a" in open(out["markdown"]).read()
    else:
        assert all(t["peak_memory_mb"] > 0 for t in timings)


SECRET = ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI", "second line sk-live-0123456789")


@pytest.mark.parametrize("extra", [[], ["--model_dir=x", "--unknown_thing=1"]])
def test_a_flagfile_including_a_file_through_dotdot_does_not_echo_it(
    tmp_path, monkeypatch, capsys, extra
):
    """Issue 31, case 18: lines of an included file that are no --flags once made the "unexpected
    arguments" error print the whole file (a CI secret, from a committed flagfile, in the logs)."""
    (tmp_path / "ci.env").write_text("\n".join(SECRET) + "\n")
    sub = tmp_path / "flags"
    sub.mkdir()
    (sub / "run.flags").write_text("--mode=teacher\n--flagfile=../ci.env\n")
    monkeypatch.chdir(sub)
    code = fc.invoke(train_cli.PROG, train_cli.main, ["--flagfile=run.flags", *extra])
    assert code == 2
    err = _one_line_error(capsys, train_cli.PROG)
    assert not any(s in err for s in ("AWS_SECRET", "wJalrXUtnFEMI", "sk-live", "second")), err
    assert "flagfile" in err or "unknown_thing" in err


def test_unexpected_arguments_echo_at_most_the_first(capsys):
    code = fc.invoke(train_cli.PROG, train_cli.main, ["--mode=teacher", "first_tok", "other_tok"])
    assert code == 2
    err = _one_line_error(capsys, train_cli.PROG)
    assert "first_tok" in err and "other_tok" not in err and "1 more" in err
