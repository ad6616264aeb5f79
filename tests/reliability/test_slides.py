"""Whole slides that once gave a traceback or a misleading message (issue 31): a slide whose
thumbnail cannot be read is skipped and listed (case 13); an absurd level-0 µm/px, from the
metadata or --slide_mpp, is one line naming the slide and the fix (case 16)."""

import json
import struct

import numpy as np
import pytest
from convert.pyramid_tiff import write_pyramid_tiff

from kd_histo.cli import convert as convert_cli
from kd_histo.cli import flags_common as fc

pytestmark = pytest.mark.reliability


def _slide(path, mpp=0.25) -> str:
    """A 256x384 px pyramidal TIFF, tissue-coloured on the left half."""
    img = np.full((256, 384, 3), 245, np.uint8)
    img[:, :192] = np.random.default_rng(0).integers(90, 200, (256, 192, 3), dtype=np.uint8)
    img[:, :192, 1] //= 2  # pinkish: saturated enough to count as tissue
    write_pyramid_tiff(str(path), img, mpp, levels=3)
    return str(path)


def _break_a_level0_tile(path: str) -> None:
    """Points level 0's first tile past the end of the file (a read error, as from a bad JPEG)."""
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        ifd = struct.unpack("<I", data[4:8])[0]
        (n,) = struct.unpack("<H", data[ifd : ifd + 2])
        for i in range(n):
            tag, _, count, value = struct.unpack(
                "<HHII", data[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
            )
            if tag == 324 and count > 1:  # TileOffsets, stored out of line
                data[value : value + 4] = struct.pack("<I", len(data) + 10**6)
        f.seek(0)
        f.write(data)


def _convert(capsys, tmp_path, *argv) -> tuple[int, str]:
    out = tmp_path / "out"
    code = fc.invoke(
        convert_cli.PROG,
        convert_cli.main,
        [
            f"--out_dir={out}",
            "--tile_px=32",
            "--target_mpp=0.5",
            "--num_workers=0",
            "--progress=false",
            *argv,
        ],
    )
    return code, capsys.readouterr().err.strip()


def test_a_slide_whose_thumbnail_cannot_be_read_is_skipped_and_listed(tmp_path, capsys):
    good = _slide(tmp_path / "good.tif")
    bad = _slide(tmp_path / "bad.tif")
    _break_a_level0_tile(bad)
    # A 64 px synthetic slide: smaller than the default speck size, so keep small pieces
    code, err = _convert(capsys, tmp_path, f"--slides={good},{bad}", "--min_tissue_area=100")
    assert code == 0, err
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    skipped = {s["path"]: s["reason"] for s in info["skipped"]}
    assert list(skipped) == [bad] and "thumbnail" in skipped[bad], skipped
    assert sum(sum(c.values()) for c in info["counts"].values()) > 0  # the good slide's tiles


def _one_line(code, err) -> str:
    assert code == 2
    assert err.startswith(f"{convert_cli.PROG}: error:") and "\n" not in err, err
    assert "lower --tile_px" not in err and len(err) < 400, err
    return err


@pytest.mark.parametrize("mpp", [1000.0, 0.005])
def test_an_absurd_mpp_in_the_metadata_is_one_line_naming_the_slide(tmp_path, capsys, mpp):
    slide = _slide(tmp_path / "s.tif", mpp=mpp)
    line = _one_line(*_convert(capsys, tmp_path, f"--slides={slide}"))
    assert slide in line and "µm/px" in line and "--slide_mpp" in line


@pytest.mark.parametrize("value", ["1000", "1e-300"])
def test_an_absurd_slide_mpp_flag_is_one_line(tmp_path, capsys, value):
    slide = _slide(tmp_path / "s.tif")
    line = _one_line(*_convert(capsys, tmp_path, f"--slides={slide}", f"--slide_mpp={value}"))
    assert "--slide_mpp" in line and "µm/px" in line
