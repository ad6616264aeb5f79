"""kd-histo-evaluate, kd-histo-cost and kd-histo-predict in-process on runs of tiny shards."""

import csv
import json
import os

import numpy as np
import pytest

from .cli_helpers import invoke


def test_evaluate_writes_the_four_files(runs, capsys):
    assert (
        invoke("evaluate", f"--model_dir={runs / 'student_x2'}", "--split=test", "--n_boot=20") == 0
    )
    out = runs / "student_x2" / "eval_test"
    for f in ("metrics.json", "predictions.csv", "confusion_matrix.png", "roc.png"):
        assert (out / f).stat().st_size > 0, f
    m = json.load(open(out / "metrics.json"))
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    labels = np.array([int(r["label"]) for r in rows])
    preds = np.array([int(r["pred"]) for r in rows])
    assert m["tile"]["n"] == len(rows) > 0
    assert m["tile"]["accuracy"] == pytest.approx(
        np.mean(labels == preds)
    )  # file and metrics agree
    assert (
        {"slide_mean", "slide_majority"} <= set(m)
        and m["run"]["view"] == "lr"
        and m["run"]["input_px"] == 16
    )
    assert "accuracy" in capsys.readouterr().out


def test_evaluate_compare_table(runs):
    dirs = []
    for name in ("teacher", "baseline_x2"):
        out = runs / name / "eval_val"
        assert (
            invoke(
                "evaluate",
                f"--model_dir={runs / name}",
                "--split=val",
                f"--out_dir={out}",
                "--n_boot=10",
            )
            == 0
        )
        dirs.append(str(out))
    prefix = runs / "comparison"
    assert (
        invoke(
            "evaluate",
            f"--compare={','.join(dirs)}",
            "--names=teacher,baseline_x2",
            f"--compare_out={prefix}",
        )
        == 0
    )
    table = list(csv.DictReader(open(f"{prefix}.csv")))
    assert [r["run"] for r in table] == ["teacher", "baseline_x2"]
    teacher = json.load(open(os.path.join(dirs[0], "metrics.json")))
    assert float(table[0]["tile_accuracy"]) == pytest.approx(teacher["tile"]["accuracy"])


def test_evaluate_bad_input_is_one_line(runs, tmp_path, capsys):
    assert invoke("evaluate", f"--model_dir={tmp_path}") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kd-histo-evaluate: error:") and "run.json" in err and "\n" not in err
    assert (
        invoke("evaluate", f"--model_dir={runs / 'teacher'}", "--split=nosuch", "--n_boot=5") == 2
    )
    assert "nosuch" in capsys.readouterr().err


def test_cost_ratios_follow_the_pixel_count(runs, tmp_path):
    out = tmp_path / "cost"
    assert (
        invoke(
            "cost",
            f"--runs={runs / 'teacher'},{runs / 'student_x2'}",
            f"--out_dir={out}",
            "--batch_sizes=1,2",
            "--repeats=2",
            "--trace_steps=1",
        )
        == 0
    )
    rows = json.load(open(out / "cost.json"))["rows"]
    assert [r["input_px"] for r in rows] == [32, 16]
    # 32 px vs 16 px: 4x the pixels; padding and the head keep it a little off 4
    assert 3.0 < rows[1]["flops_ratio_to_ref"] < 4.5 and rows[0]["flops_ratio_to_ref"] == 1.0
    assert rows[0]["params"] == rows[1]["params"]
    assert (out / "cost.md").read_text().count("|") > 10
    assert any(f.endswith(".xplane.pb") for _, _, fs in os.walk(out / "trace") for f in fs)


def test_cost_needs_runs(capsys):
    assert invoke("cost") == 2
    assert "--runs is required" in capsys.readouterr().err


def test_predict_on_shards_and_tile_folder(runs, tiny_shards, tmp_path):
    from PIL import Image

    from kd_histo.data import synthetic

    folder = tmp_path / "tiles" / "caseA"
    folder.mkdir(parents=True)
    images, _, _ = synthetic.generate(
        1, 40, seed=3, slides_per_class=1
    )  # 40 px: resized to the run's 32
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"t{i}.png")
    out = tmp_path / "pred"
    assert (
        invoke(
            "predict",
            f"--model_dir={runs / 'student_x2'}",
            f"--inputs={tiny_shards},{tmp_path / 'tiles'}",
            f"--out_dir={out}",
            "--split=test",
        )
        == 0
    )
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    n_test = json.load(open(os.path.join(tiny_shards, "dataset.json")))["counts"]["test"]
    assert len(rows) == sum(n_test.values()) + len(images)
    probs = np.array([[float(r[k]) for k in r if k.startswith("prob_")] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    slides = {r["slide_id"]: r for r in csv.DictReader(open(out / "slides.csv"))}
    assert int(slides["caseA"]["n_tiles"]) == len(images)


def test_predict_bad_input(runs, tmp_path, capsys):
    assert (
        invoke("predict", f"--model_dir={runs / 'teacher'}", f"--inputs={tmp_path / 'nope.svs'}")
        == 2
    )
    assert "not found" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    assert (
        invoke("predict", f"--model_dir={runs / 'teacher'}", f"--inputs={tmp_path / 'notes.txt'}")
        == 2
    )
    assert "whole-slide" in capsys.readouterr().err


@pytest.mark.realdata
def test_predict_on_the_real_slide_with_heatmap(runs, shared_data, tmp_path):
    slides = sorted(
        p for p in shared_data.rglob("*") if p.suffix.lower() in (".svs", ".ndpi", ".mrxs")
    )
    if not slides:
        pytest.skip(f"no whole-slide image under {shared_data}")
    out = tmp_path / "pred"
    assert (
        invoke(
            "predict",
            f"--model_dir={runs / 'teacher'}",
            f"--inputs={slides[0]}",
            f"--out_dir={out}",
            "--max_tiles=12",
            "--heatmap",
            "--read_mpp=2.0",
        )
        == 0
    )
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert 0 < len(rows) <= 12 and len({(r["x"], r["y"]) for r in rows}) == len(rows)
    assert (out / "heatmaps" / f"{slides[0].stem}.png").stat().st_size > 0


@pytest.mark.realdata
def test_predict_a_slide_at_the_runs_own_mpp_without_read_mpp(runs, shared_data, tmp_path):
    """The tile µm/px comes from run.json (tiny_shards: 0.5); --read_mpp only overrides it."""
    from kd_histo.convert import slides as slides_mod

    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    if not slide.is_file():
        pytest.skip(f"{slide} is absent")
    s = slides_mod.open_slide(str(slide))
    base = float(s.properties["openslide.mpp-x"])
    s.close()
    for extra, mpp in (((), 0.5), (("--read_mpp=2.0",), 2.0)):
        out = tmp_path / f"pred_{mpp:g}"
        assert (
            invoke(
                "predict",
                f"--model_dir={runs / 'student_x2'}",
                f"--inputs={slide}",
                f"--out_dir={out}",
                "--max_tiles=6",
                *extra,
            )
            == 0
        )
        step = round(32 * mpp / base)  # level-0 px of one 32 px tile at that µm/px
        xy = [(int(r["x"]), int(r["y"])) for r in csv.DictReader(open(out / "predictions.csv"))]
        assert xy and all(x % step == 0 and y % step == 0 for x, y in xy)
        if (
            mpp == 0.5
        ):  # off the 2 µm/px grid: the run's own µm/px was used, not the old 2.0 / 0.5 default
            assert any(x % (4 * step) or y % (4 * step) for x, y in xy)


def test_evaluate_cascade_curve_and_predict_cascade_flags(runs, tmp_path, capsys):
    out = tmp_path / "cascade_eval"
    assert (
        invoke(
            "evaluate",
            f"--model_dir={runs / 'student_x2'}",
            f"--cascade_teacher={runs / 'teacher'}",
            "--cascade_fractions=0,0.5",
            f"--out_dir={out}",
            "--n_boot=10",
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "cascade, teacher on 0.0%" in printed and "cascade, teacher alone" in printed
    rows = list(csv.DictReader(open(out / "cascade.csv")))
    assert [r["scored_by"] for r in rows] == ["cascade", "cascade", "teacher"]
    assert (out / "cascade.png").stat().st_size > 0
    # a baseline reads LR tiles: it cannot be the cascade's teacher; a bad fraction is one line too
    for bad, words in (
        ((f"--cascade_teacher={runs / 'baseline_x2'}",), "HR tiles"),
        ((f"--cascade_teacher={runs / 'teacher'}", "--cascade_fractions=0,2"), "[0, 1]"),
    ):
        assert (
            invoke(
                "evaluate",
                f"--model_dir={runs / 'student_x2'}",
                f"--out_dir={tmp_path / 'x'}",
                *bad,
            )
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err
    for bad in ((f"--cascade_teacher={runs / 'teacher'}",), ("--cascade_fraction=0.1",)):
        assert (
            invoke("predict", f"--model_dir={runs / 'student_x2'}", f"--inputs={tmp_path}", *bad)
            == 2
        )
        assert "cascade" in capsys.readouterr().err
