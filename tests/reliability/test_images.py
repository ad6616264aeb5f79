"""Bad and odd tile images: each is skipped with its reason, converted with a note, or stops the
conversion with an error naming the file; nothing else is lost.

Also proven elsewhere (marked ``reliability``): tests/convert/test_tiles.py (zero-byte, junk and
.gif files, a truncated PNG, grayscale/palette/16-bit/RGBA pixel values and notes, a real 300x300
image over ``max_pixels``) and tests/convert/test_convert.py
(``test_bad_files_are_skipped_and_reported_or_fatal_with_strict``: skips in dataset.json, --strict).
"""

import io
import os
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from kd_histo import schema
from kd_histo.convert import ConversionError, ConvertConfig, EncodeOptions, convert, tiles
from kd_histo.convert.errors import SkipInput

from .helpers import encoded, giant_jpeg, giant_png, giant_tiff, rgb, write

pytestmark = pytest.mark.reliability


@pytest.mark.parametrize(
    "fmt,ext,decoder,reason",
    [
        ("PNG", ".png", "pil", "unreadable image: image file is truncated"),
        ("JPEG", ".jpg", "pil", "unreadable image: image file is truncated"),
        ("TIFF", ".tif", "pil", "unreadable image: image file is truncated"),
        # libtiff (under tensorflow-io) fills the missing rows with zeros and only logs a warning;
        # the header check catches the truncation before it decodes.
        (
            "TIFF",
            ".tif",
            "tfio",
            "truncated TIFF: its image data end at byte {full}, the file has {cut}",
        ),
    ],
)
def test_truncated_image_is_skipped_with_the_reason(tmp_path, fmt, ext, decoder, reason):
    data = encoded(rgb(1, 32), fmt)
    cut = len(data) * 3 // 4
    path = write(tmp_path / f"cut{ext}", data[:cut])
    with pytest.raises(SkipInput) as e:
        tiles.read_tile(path, decoder=decoder)
    assert str(e.value).startswith(reason.format(full=len(data), cut=cut))


@pytest.mark.parametrize(
    "make,ext,decoder",
    [
        (giant_png, ".png", "pil"),
        (giant_jpeg, ".jpg", "pil"),
        (giant_tiff, ".tif", "pil"),
        (giant_tiff, ".tif", "tfio"),  # tensorflow-io used to decode first, then check the size
    ],
)
def test_enormous_declared_size_is_refused_before_decoding(tmp_path, make, ext, decoder):
    path = write(tmp_path / f"bomb{ext}", make(60000, 60000))  # 3.6 gigapixels in a few bytes
    assert os.path.getsize(path) < 5000
    with pytest.raises(SkipInput) as e:
        tiles.read_tile(path, decoder=decoder)
    assert str(e.value).startswith("decompression bomb refused: Image size (3600000000 pixels)")


def test_max_pixels_guards_the_tensorflow_io_tiff_path_too(tmp_path):
    path = write(tmp_path / "big.tif", giant_tiff(200, 200))
    with pytest.raises(
        SkipInput, match=r"^decompression bomb refused: 200x200 px > max_pixels=10000$"
    ):
        tiles.read_tile(path, max_pixels=10_000, decoder="tfio")


@pytest.mark.parametrize(
    "fmt,ext,decoder",
    [
        ("PNG", ".jpg", "pil"),
        ("JPEG", ".png", "pil"),
        ("PNG", ".tif", "tfio"),
        ("TIFF", ".png", "pil"),
    ],
)
def test_wrong_extension_is_read_by_content_with_a_note(tmp_path, fmt, ext, decoder):
    data = encoded(rgb(2), fmt)
    path = write(tmp_path / f"x{ext}", data)
    got, notes = tiles.read_tile(path, decoder=decoder)
    with Image.open(path) as img:  # what the bytes really hold
        np.testing.assert_array_equal(got, np.asarray(img.convert("RGB")))
    assert notes == [f"{ext} file holds {fmt} data (read by its content)"]


def test_non_image_bytes_with_an_image_extension_are_skipped(tmp_path):
    path = write(tmp_path / "readme.png", b"# not an image\n")
    with pytest.raises(SkipInput, match=r"^unreadable image: cannot identify image file"):
        tiles.read_tile(path)


def _cfg(tmp_path, **encode):
    return ConvertConfig(
        out_dir=str(tmp_path / "out"),
        input_dir=str(tmp_path / "in"),
        fractions=(1.0, 0.0, 0.0),
        encode=EncodeOptions(**{"tile_px": 16, **encode}),
        allow_one_class=True,  # one class folder: these tests are about reading the images
    )


def test_one_pixel_image_stops_a_crop_conversion_naming_the_file_or_is_upsampled(tmp_path):
    write(tmp_path / "in" / "a" / "ok.png", encoded(rgb(3), "PNG"))
    dot = write(
        tmp_path / "in" / "a" / "dot.png", encoded(np.full((1, 1, 3), 200, np.uint8), "PNG")
    )
    with pytest.raises(ConversionError) as e:
        convert(_cfg(tmp_path))
    assert str(e.value) == (
        f"{dot}: tile_px=16 is larger than an input image (1x1 px); "
        "pass --tile_px<=1 or --fit=resize"
    )
    assert not os.path.exists(tmp_path / "out" / "dataset.json")
    cfg = ConvertConfig(
        out_dir=str(tmp_path / "resized"),
        input_dir=str(tmp_path / "in"),
        fractions=(1.0, 0.0, 0.0),
        encode=EncodeOptions(tile_px=16, fit="resize"),
        allow_one_class=True,
    )
    info = convert(cfg)
    assert info.counts == {"train": {"a": 2}} and info.skipped == []
    assert "1 inputs: smaller than tile_px: upsampled (--fit=resize)" in info.notes


def test_class_folder_of_odd_and_bad_files_loses_nothing_and_reports_every_skip(tmp_path):
    a = tmp_path / "in" / "a"
    base = rgb(4)
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgba = np.dstack(
        [base, np.where(np.arange(16)[:, None] < 8, 255, 0).repeat(16, 1).astype(np.uint8)]
    )
    pal = Image.fromarray(rgb(5)).convert("P", palette=Image.ADAPTIVE, colors=8)
    w16 = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)
    expected = {  # converted file -> the RGB tile it must become
        write(a / "rgb.png", encoded(base, "PNG")): base,
        write(a / "gray.png", encoded(gray, "PNG")): np.repeat(gray[..., None], 3, 2),
        write(a / "rgba.png", encoded(rgba, "PNG")): np.where(
            np.arange(16)[:, None, None] < 8, base, 255
        ).astype(np.uint8),
        write(a / "palette.png", b""): np.asarray(pal.convert("RGB")),
        write(a / "w16.png", b""): np.round(w16 / 65535 * 255)
        .astype(np.uint8)[..., None]
        .repeat(3, 2),
        write(a / "png_named.jpg", encoded(base[::-1], "PNG")): base[::-1],
        write(tmp_path / "in" / "b" / "b.png", encoded(rgb(6), "PNG")): rgb(6),
    }
    pal.save(a / "palette.png")
    Image.fromarray(w16).save(a / "w16.png")
    jpeg = encoded(rgb(7), "JPEG")
    bad = {  # skipped file -> its reason (a regular expression matched at the start)
        write(a / "zero.png", b""): r"zero-byte file$",
        write(a / "cut.jpg", jpeg[: len(jpeg) // 2]): (
            r"unreadable image: (image file is truncated|Truncated File Read)"
        ),
        write(a / "bomb.png", giant_png(60000, 60000)): r"decompression bomb refused: Image size",
        write(a / "text.png", b"hello"): r"unreadable image: cannot identify image file",
        write(a / "notes.txt", b"scanner notes"): r"not an image \(side file \.txt\)$",
        write(a / "slide.doc", b"doc"): r"unsupported file type \.doc",
        write(a / "LICENSE", b"MIT"): r"unsupported file type \(none\)",
    }
    info = convert(_cfg(tmp_path))
    on_disk = schema.DatasetInfo.read(str(tmp_path / "out"))
    assert on_disk.skipped == info.skipped
    reasons = {s["path"]: s["reason"] for s in on_disk.skipped}
    assert sorted(reasons) == sorted(bad)
    for path, reason in bad.items():
        assert re.match(reason, reasons[path]), (path, reasons[path])
    assert (
        f"{len(expected) + len(bad)} inputs listed (files, slides, HDF5 patches), "
        f"{len(bad)} skipped" in info.notes
    )
    for note in (
        "1 inputs: L grayscale -> RGB",
        "1 inputs: RGBA -> RGB (alpha composited on white)",
        "1 inputs: palette -> RGB (transparency composited on white)",
        "1 inputs: I;16 grayscale -> 8-bit RGB (scaled by 255/65535)",
        "1 inputs: .jpg file holds PNG data (read by its content)",
    ):
        assert note in info.notes
    assert info.counts == {"train": {"a": 6, "b": 1}}
    got = {}
    for shard in schema.shard_paths(str(tmp_path / "out"), "train"):
        for raw in tf.data.TFRecordDataset(shard).as_numpy_iterator():
            r = schema.parse_example_numpy(raw)
            got[r["source"].decode()] = np.asarray(
                Image.open(io.BytesIO(r["image"])).convert("RGB")
            )
    assert sorted(got) == sorted(expected)
    for path, want in expected.items():
        np.testing.assert_array_equal(got[path], want, err_msg=path)
