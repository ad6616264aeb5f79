"""kd-histo-predict's inputs as a user gives them (issue 31): a folder holding a whole-slide TIFF
predicts it as a slide, not as one tile (case 2); a folder of slides, a quoted glob, a slide name
holding a comma and a list file (--inputs_file) all work, missing ones named in one line
(case 15); a slide without µm/px predicts with --slide_mpp (case 14)."""

import csv
import os

import numpy as np
import pytest
import tifffile
from convert.pyramid_tiff import write_pyramid_tiff
from PIL import Image

from kd_histo.cli import flags_common as fc
from kd_histo.cli import predict as predict_cli

from .helpers import encoded, rgb, write

pytestmark = pytest.mark.reliability


def _tissue(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Tissue-coloured on the left half, glass on the right."""
    img = np.full((h, w, 3), 245, np.uint8)
    img[:, : w // 2] = np.random.default_rng(seed).integers(90, 200, (h, w // 2, 3), np.uint8)
    img[:, : w // 2, 1] //= 2  # pinkish: saturated enough to count as tissue
    return img


def _slide(path, seed: int = 0) -> str:
    """A 256x384 px pyramidal TIFF at 0.25 µm/px (any name: OpenSlide reads it by content)."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    write_pyramid_tiff(str(path), _tissue(256, 384, seed), 0.25, levels=3)
    return str(path)


def _predict(capsys, run, out, *argv) -> tuple[int, str]:
    code = fc.invoke(
        predict_cli.PROG,
        predict_cli.main,
        [f"--model_dir={run}", f"--out_dir={out}", "--num_workers=0", *argv],
    )
    return code, capsys.readouterr().err.strip()


def _rows(out, name: str) -> list[dict]:
    with open(os.path.join(out, name), newline="") as f:
        return list(csv.DictReader(f))


def _slide_ids(out) -> list[str]:
    return sorted(r["slide_id"] for r in _rows(out, "slides.csv"))


def _one_line(code, err, *words) -> str:
    assert code == 2, err[-2000:]
    last = err.splitlines()[-1]
    assert last.startswith(f"{predict_cli.PROG}: error:"), err[-2000:]
    assert "Traceback" not in err and all(w in last for w in words), last
    return last


# --- case 15: folders of slides, globs, names with commas, list files --------------------------


def test_a_folder_of_slides_predicts_each_slide(teacher_run, tmp_path, capsys):
    _slide(tmp_path / "newslides" / "s1.svs")
    _slide(tmp_path / "newslides" / "s2.svs", seed=1)
    out = tmp_path / "out"
    code, err = _predict(capsys, teacher_run, out, f"--inputs={tmp_path / 'newslides'}/")
    assert code == 0, err
    assert _slide_ids(out) == ["s1", "s2"]
    assert os.path.isfile(out / "s1.geojson") and os.path.isfile(out / "s2.geojson")


def test_a_quoted_glob_expands(teacher_run, tmp_path, capsys):
    for name in ("a.svs", "b.svs", "c.ndpi.txt"):
        _slide(tmp_path / "slides" / name)
    out = tmp_path / "out"
    code, err = _predict(capsys, teacher_run, out, f"--inputs={tmp_path / 'slides'}/*.svs")
    assert code == 0, err
    assert _slide_ids(out) == ["a", "b"]
    # a glob that matches nothing is named
    code, err = _predict(capsys, teacher_run, tmp_path / "o2", f"--inputs={tmp_path}/none/*.svs")
    _one_line(code, err, "none/*.svs")


def test_a_slide_name_with_a_comma_can_be_given_quoted(teacher_run, tmp_path, capsys):
    slide = _slide(tmp_path / "case 7, block 2.svs")
    out = tmp_path / "out"
    code, err = _predict(capsys, teacher_run, out, f'--inputs="{slide}"')
    assert code == 0, err
    assert _slide_ids(out) == ["case 7, block 2"]


def test_inputs_file_takes_one_path_per_line(teacher_run, tmp_path, capsys):
    _slide(tmp_path / "slides" / "x, y.svs")
    _slide(tmp_path / "slides" / "z.svs", seed=2)
    listing = tmp_path / "slides" / "list.txt"
    listing.write_text("# slides of batch 1\n\nx, y.svs\n  \n" + f"{tmp_path / 'slides'}/z.svs\n")
    out = tmp_path / "out"
    code, err = _predict(capsys, teacher_run, out, f"--inputs_file={listing}")
    assert code == 0, err
    assert _slide_ids(out) == ["x, y", "z"]
    # every missing file in one line, before any work
    listing.write_text("x, y.svs\ngone1.svs\n# a comment\ngone2.svs\n")
    code, err = _predict(capsys, teacher_run, tmp_path / "o2", f"--inputs_file={listing}")
    line = _one_line(code, err, "gone1.svs", "gone2.svs", str(listing))
    assert "x, y.svs" not in line.split("gone1")[1]
    assert not os.path.exists(tmp_path / "o2" / "predictions.csv")


def test_a_missing_inputs_file_is_one_line(teacher_run, tmp_path, capsys):
    code, err = _predict(capsys, teacher_run, tmp_path / "o", f"--inputs_file={tmp_path}/no.txt")
    _one_line(code, err, "no.txt")


# --- case 2: a whole-slide TIFF inside a tile folder -----------------------------------------


def test_a_whole_slide_tiff_in_a_folder_is_a_slide_not_a_tile(teacher_run, tmp_path, capsys):
    folder = tmp_path / "folder"
    # a plain (stripped, single-level) TIFF far larger than a tile, as an image editor saves it
    Image.fromarray(_tissue(300, 400)).save(folder.mkdir() or folder / "region.tif")
    _slide(folder / "pyramid.tif", seed=3)  # a tiled pyramid
    for i in range(3):  # tiles of the run's size beside them, a .tif among them
        write(folder / "tiles" / f"t{i}.png", encoded(rgb(i, 32), "PNG"))
    write(folder / "tiles" / "t3.tif", encoded(rgb(3, 32), "TIFF"))
    out = tmp_path / "out"
    code, err = _predict(capsys, teacher_run, out, f"--inputs={folder}", "--slide_mpp=0.25")
    assert code == 0, err
    per_slide = {r["slide_id"]: int(r["n_tiles"]) for r in _rows(out, "slides.csv")}
    assert set(per_slide) == {"region", "pyramid", "tiles"}, per_slide
    assert per_slide["tiles"] == 4
    # the 300x400 px region at 0.25 µm/px is 2x3 tiles of 32 px at 0.5 µm/px, half tissue
    assert per_slide["region"] > 1 and per_slide["pyramid"] > 1, per_slide


# --- case 14: a slide without µm/px ----------------------------------------------------------


def test_a_slide_without_mpp_predicts_with_slide_mpp(teacher_run, tmp_path, capsys):
    slide = str(tmp_path / "nompp.tif")
    tifffile.imwrite(slide, _tissue(256, 384), tile=(64, 64), photometric="rgb")
    code, err = _predict(capsys, teacher_run, tmp_path / "o1", f"--inputs={slide}")
    _one_line(code, err, slide, "--slide_mpp")
    out = tmp_path / "o2"
    code, err = _predict(capsys, teacher_run, out, f"--inputs={slide}", "--slide_mpp=0.25")
    assert code == 0, err
    rows = _rows(out, "slides.csv")
    assert [r["slide_id"] for r in rows] == ["nompp"] and int(rows[0]["n_tiles"]) > 1
