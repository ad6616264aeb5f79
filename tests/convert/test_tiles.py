"""Reading one tile: mode conversions with notes, bad files as skips, bomb guard, tfio TIFF path."""

import numpy as np
import pytest
from PIL import Image

from kd_histo.convert import tiles
from kd_histo.convert.errors import ConversionError, SkipInput

from .helpers import random_rgb, write_image


def test_rgb_png_is_read_exactly(tmp_path):
    rgb = random_rgb(0)
    got, notes = tiles.read_tile(write_image(tmp_path / "a.png", rgb))
    np.testing.assert_array_equal(got, rgb)
    assert notes == []


@pytest.mark.reliability
def test_rgba_is_composited_on_white_with_a_note(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red-ish, bottom transparent
    got, notes = tiles.read_tile(write_image(tmp_path / "a.png", rgba))
    np.testing.assert_array_equal(got[:2], np.broadcast_to([200, 0, 0], (2, 4, 3)))
    np.testing.assert_array_equal(got[2:], np.full((2, 4, 3), 255))
    assert any("alpha" in n for n in notes)


@pytest.mark.reliability
def test_grayscale_palette_and_16bit_become_rgb8(tmp_path):
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    got, notes = tiles.read_tile(write_image(tmp_path / "g.png", gray))
    np.testing.assert_array_equal(got, np.repeat(gray[..., None], 3, 2))
    assert notes and "grayscale" in notes[0]

    pal = Image.fromarray(random_rgb(1, 8)).convert("P", palette=Image.ADAPTIVE, colors=8)
    pal.save(tmp_path / "p.png")
    got, notes = tiles.read_tile(str(tmp_path / "p.png"))
    np.testing.assert_array_equal(got, np.asarray(pal.convert("RGB")))
    assert any("palette" in n for n in notes)

    g16 = np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369  # 0 .. 65535
    Image.fromarray(g16).save(tmp_path / "w.png")
    got, notes = tiles.read_tile(str(tmp_path / "w.png"))
    np.testing.assert_array_equal(got[..., 0], np.round(g16 / 65535 * 255).astype(np.uint8))
    assert got.dtype == np.uint8 and any("8-bit" in n for n in notes)


@pytest.mark.reliability
@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("empty.png", b"", "zero-byte"),
        ("junk.png", b"not an image at all", "unreadable"),
        ("a.gif", b"GIF89a", "unsupported"),
    ],
)
def test_bad_files_raise_skip_with_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SkipInput, match=reason):
        tiles.read_tile(str(path))


@pytest.mark.reliability
def test_truncated_png_is_skipped(tmp_path):
    path = write_image(tmp_path / "t.png", random_rgb(2, 64))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(SkipInput, match="unreadable"):
        tiles.read_tile(path)


@pytest.mark.reliability
def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = write_image(tmp_path / "big.png", np.zeros((300, 300, 3), np.uint8))
    with pytest.raises(SkipInput, match="decompression bomb"):
        tiles.read_tile(path, max_pixels=10_000)


def test_tfio_tiff_decoder_matches_pillow(tmp_path):
    rgb = random_rgb(3, 24)
    path = write_image(tmp_path / "a.tif", rgb)
    got, _ = tiles.read_tile(path, decoder="tfio")
    np.testing.assert_array_equal(got, rgb)


def test_fit_tile_crops_centre_resizes_and_rejects_small_images():
    rgb = random_rgb(4, 10)
    np.testing.assert_array_equal(tiles.fit_tile(rgb, 6), rgb[2:8, 2:8])
    assert tiles.fit_tile(rgb, 5, "resize").shape == (5, 5, 3)
    with pytest.raises(ConversionError, match="--tile_px<=10"):
        tiles.fit_tile(rgb, 12)
