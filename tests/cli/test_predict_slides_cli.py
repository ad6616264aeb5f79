"""kd-histo-predict on slides read at the model's own level, and on folders of unreadable images."""

import csv
import json

import numpy as np
import pytest
import tifffile
from convert.pyramid_tiff import write_pyramid_tiff
from PIL import Image

from kd_histo.data import synthetic
from kd_histo.evaluation import cascade, slide_reader

from .cli_helpers import invoke


def _slide(path, levels):
    rng = np.random.default_rng(1)
    img = np.full((256, 384, 3), 245, np.uint8)
    for i in range(4):
        for j in range(3):
            img[i * 64 : (i + 1) * 64, j * 64 : (j + 1) * 64] = synthetic.render_tile(
                rng, (i + j) % 4, 64
            )
    write_pyramid_tiff(str(path), img, 0.25, levels=levels)
    return str(path)


def test_student_reads_the_slide_level_at_its_resolution(runs, tmp_path, capsys):
    # the tiny runs: 32 px HR tiles; at 0.5 µm/px a tile spans 64 level-0 px of this 0.25 µm/px
    # slide,
    # and the x2 student's 16 px input is 1.0 µm/px: level 2, read as stored
    slide = _slide(tmp_path / "pyr.tif", levels=3)
    out = tmp_path / "pred"
    assert (
        invoke(
            "predict",
            f"--model_dir={runs / 'student_x2'}",
            f"--inputs={slide}",
            f"--out_dir={out}",
            "--read_mpp=0.5",
            "--batch_size=5",
            "--heatmap",
        )
        == 0
    )
    said = capsys.readouterr()
    printed = said.out  # the slide's summary line; notes go to stderr
    plan = slide_reader.plan_read(slide, hr_px=32, hr_mpp=0.5, input_px=16)
    assert len(plan.coords) >= 8 and f"pyr: {len(plan.coords)} tiles in" in printed
    assert (
        "level 2 at 1 µm/px, 16 px reads, 16 px model input" in printed
        and "no pyramid level" not in printed + said.err
    )
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [(int(r["x"]), int(r["y"])) for r in rows] == list(
        plan.coords
    )  # every tissue tile, in order
    assert (out / "heatmaps" / "pyr.png").stat().st_size > 0
    # the tile's side: 64 level-0 px of 0.25 µm/px = 16 µm
    assert {(r["tile_px_l0"], float(r["tile_um"])) for r in rows} == {("64", 16.0)}
    _check_qupath_files(out, "pyr", rows, plan.size_l0)


def _check_qupath_files(out, sid, rows, size):
    """<slide>.geojson and <slide>_probabilities.ome.tif say what predictions.csv says."""
    names = [k[len("prob_") :] for k in rows[0] if k.startswith("prob_")]
    features = json.loads((out / f"{sid}.geojson").read_text())["features"]
    assert len(features) == len(rows)
    for f, r in zip(features, rows):
        x, y = int(r["x"]), int(r["y"])
        assert f["geometry"]["coordinates"] == [
            [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
        ]
        props = f["properties"]
        assert props["objectType"] == "tile" and props["classification"]["name"] == r["pred_name"]
        for c in names:
            assert props["measurements"][f"prob_{c}"] == pytest.approx(float(r[f"prob_{c}"]))
        if "scored_by" in r:
            assert props["measurements"]["scored_by_teacher"] == (r["scored_by"] == "teacher")
    with tifffile.TiffFile(out / f"{sid}_probabilities.ome.tif") as tif:
        assert tif.is_ome and tif.series[0].axes == "CYX"
        level0 = tif.series[0].levels[0].asarray()
        assert f'Name="{names[0]}"' in tif.ome_metadata and len(names) == level0.shape[0]
    for r in rows:
        got = level0[:, int(r["y"]) // size, int(r["x"]) // size]
        want = [round(255 * float(r[f"prob_{c}"])) for c in names]
        np.testing.assert_allclose(got, want, atol=1)  # the CSV's 6 decimals may round apart


def test_heatmaps_per_class_from_the_streamed_thumbnail(runs, tmp_path, monkeypatch, capsys):
    import openslide

    def whole_level(*args, **kwargs):
        raise AssertionError("get_thumbnail reads a whole pyramid level")

    monkeypatch.setattr(openslide.OpenSlide, "get_thumbnail", whole_level)
    slide = _slide(tmp_path / "pyr.tif", levels=1)  # single level: get_thumbnail reads level 0
    out = tmp_path / "pred"
    names = list(synthetic.CLASS_NAMES)
    common = [f"--model_dir={runs / 'teacher'}", f"--inputs={slide}", "--read_mpp=0.5"]
    asked = f"--heatmap_classes={names[2]},{names[0]}"
    assert invoke("predict", *common, f"--out_dir={out}", asked, "--num_workers=0") == 0
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == sorted(
        f"pyr_{c}.png" for c in (names[2], names[0])
    )
    assert all(p.stat().st_size > 0 for p in (out / "heatmaps").iterdir())
    capsys.readouterr()
    bad = invoke("predict", *common, f"--out_dir={tmp_path / 'x'}", "--heatmap_classes=nope")
    err = capsys.readouterr().err.strip()
    assert bad == 2 and "'nope' is no class of the model" in err and "\n" not in err
    assert not (tmp_path / "x").exists()  # refused before any work


def test_a_single_level_slide_is_shrunk_with_a_note(runs, tmp_path, capsys):
    slide = _slide(tmp_path / "flat.tif", levels=1)
    out = tmp_path / "pred"
    assert (
        invoke(
            "predict",
            f"--model_dir={runs / 'student_x2'}",
            f"--inputs={slide}",
            f"--out_dir={out}",
            "--read_mpp=0.5",
            "--num_workers=0",
        )
        == 0
    )
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "no pyramid level" in ln]
    assert len(notes) == 1 and notes[0].endswith("reading level 0 and shrinking 4x")
    assert notes[0].startswith("kd-histo-predict: ")
    plan = slide_reader.plan_read(slide, hr_px=32, hr_mpp=0.5, input_px=16)
    assert plan.level == 0 and len(list(csv.DictReader(open(out / "predictions.csv")))) == len(
        plan.coords
    )


@pytest.mark.reliability  # issue 15 case 10: make test-reliability runs and counts it
def test_folder_with_unreadable_images_skips_and_lists_them(runs, tmp_path, capsys):
    folder = tmp_path / "tiles" / "caseA"
    folder.mkdir(parents=True)
    images, _, _ = synthetic.generate(1, 32, seed=3, slides_per_class=1)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"t{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "empty.jpg").write_bytes(b"")
    out = tmp_path / "pred"
    assert (
        invoke(
            "predict",
            f"--model_dir={runs / 'teacher'}",
            f"--inputs={tmp_path / 'tiles'}",
            f"--out_dir={out}",
        )
        == 0
    )
    assert "kd-histo-predict: skipped 2 unreadable image(s)" in capsys.readouterr().err
    skipped = list(csv.DictReader(open(out / "skipped.csv")))
    assert sorted(r["path"].rsplit("/", 1)[1] for r in skipped) == ["broken.png", "empty.jpg"]
    assert all(r["reason"] for r in skipped)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert sorted(r["source"] for r in rows) == sorted(
        str(folder / f"t{i}.png") for i in range(len(images))
    )
    # nothing readable at all: one line, exit 2
    bad = tmp_path / "bad" / "caseB"
    bad.mkdir(parents=True)
    (bad / "x.png").write_bytes(b"nope")
    assert (
        invoke(
            "predict",
            f"--model_dir={runs / 'teacher'}",
            f"--inputs={tmp_path / 'bad'}",
            f"--out_dir={tmp_path / 'pred2'}",
        )
        == 2
    )
    # stderr: the skipped-images warning, then the error in one line
    *notes, err = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("kd-histo-predict: error: no readable tile")
    assert [n.split(" unreadable")[0] for n in notes] == ["kd-histo-predict: skipped 1"]


def test_cascade_teacher_rereads_the_slide_tiles_at_its_own_level(runs, tmp_path):
    slide = _slide(tmp_path / "pyr.tif", levels=3)
    common = [f"--inputs={slide}", "--read_mpp=0.5"]
    assert (
        invoke(
            "predict",
            f"--model_dir={runs / 'student_x2'}",
            f"--cascade_teacher={runs / 'teacher'}",
            "--cascade_fraction=0.5",
            f"--out_dir={tmp_path / 'cascade'}",
            *common,
        )
        == 0
    )
    assert (
        invoke(
            "predict",
            f"--model_dir={runs / 'teacher'}",
            f"--out_dir={tmp_path / 'teacher'}",
            *common,
        )
        == 0
    )
    rows = list(csv.DictReader(open(tmp_path / "cascade" / "predictions.csv")))
    alone = {
        (r["x"], r["y"]): r for r in csv.DictReader(open(tmp_path / "teacher" / "predictions.csv"))
    }
    by_teacher = [r for r in rows if r["scored_by"] == "teacher"]
    assert len(by_teacher) == cascade.n_for_teacher(len(rows), 0.5) > 0 and len(alone) == len(rows)
    for r in by_teacher:  # the teacher's own reading of the same tile (level 1, 32 px)
        want = alone[(r["x"], r["y"])]
        got = [float(r[k]) for k in r if k.startswith("prob_")]
        np.testing.assert_allclose(
            got, [float(want[k]) for k in want if k.startswith("prob_")], atol=1e-4
        )
    _check_qupath_files(tmp_path / "cascade", "pyr", rows, 64)


def test_slide_outputs_do_not_depend_on_the_batch(runs, tmp_path):
    # a student's batch holds up to batch_size HR tiles' pixels (slide_predict.tiles_per_batch):
    # the bytes written must not change with it (each tile is normalised on its own)
    from kd_histo.evaluation.slide_predict import tiles_per_batch

    assert tiles_per_batch(32, 224, 28) == 256 and tiles_per_batch(5, 32, 16) == 20
    assert tiles_per_batch(32, 224, 224) == 32 and tiles_per_batch(512, 224, 28) == 512
    slide = _slide(tmp_path / "pyr.tif", levels=3)
    outs = []
    for batch, workers in ((1, 0), (3, 2), (64, 2)):
        out = tmp_path / f"pred_{batch}"
        argv = [f"--model_dir={runs / 'student_x2'}", f"--inputs={slide}", f"--out_dir={out}"]
        argv += ["--read_mpp=0.5", f"--batch_size={batch}", f"--num_workers={workers}"]
        assert invoke("predict", *argv) == 0
        outs.append(
            [(out / n).read_bytes() for n in ("predictions.csv", "pyr_probabilities.ome.tif")]
        )
    assert outs[0] == outs[1] == outs[2]
