"""Float TIFF tiles (issue 31, case 3): a tile with a NaN or inf pixel was stored all black with
its label (80 numpy RuntimeWarnings, "0 inputs skipped"); it is now skipped and listed with the
reason, without a numpy warning. Float tiles are converted by one stated rule: values in [0, 1]
are fractions of white, values in [0, 255] are 8-bit levels, anything else is refused."""

import json
import warnings

import numpy as np
import pytest
import tifffile
from PIL import Image

from kd_histo.convert.errors import SkipInput
from kd_histo.convert.tiles import read_tile

from .helpers import convert_class_tree, write_class_tree

pytestmark = pytest.mark.reliability


def _gray(path, values: np.ndarray) -> str:
    Image.fromarray(values.astype(np.float32), mode="F").save(path)
    return str(path)


def _rgb(path, values: np.ndarray) -> str:
    tifffile.imwrite(str(path), values.astype(np.float32), photometric="rgb")
    return str(path)


def test_non_finite_float_tiles_are_skipped_and_listed_without_warnings(tmp_path, capsys):
    src = tmp_path / "src"
    write_class_tree(src, per_class=4, px=16, seed=0)
    bad = np.full((16, 16), 0.5)
    bad[3, 4] = np.nan
    nan_gray = _gray(src / "a" / "nan.tif", bad)
    bad[3, 4] = np.inf
    inf_gray = _gray(src / "b" / "inf.tif", bad)
    rgb = np.full((16, 16, 3), 0.25)
    rgb[0, 0, 1] = -np.inf
    inf_rgb = _rgb(src / "b" / "inf_rgb.tif", rgb)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's "invalid value" would raise
        code, err = convert_class_tree(capsys, src, out)
    assert code == 0, err
    info = json.loads((out / "dataset.json").read_text())
    skipped = {s["path"]: s["reason"] for s in info["skipped"]}
    assert set(skipped) == {nan_gray, inf_gray, inf_rgb}, skipped
    assert all("NaN" in r and "inf" in r for r in skipped.values()), skipped
    assert sum(sum(c.values()) for c in info["counts"].values()) == 8  # the PNG tiles only


@pytest.mark.parametrize("write", [_gray, _rgb])
def test_float_tiles_follow_the_stated_rule(tmp_path, write):
    shape = (16, 16, 3) if write is _rgb else (16, 16)
    expect = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    expect[0, 0] = 255  # white present: a fraction image reaches 1.0
    white = expect / 255.0
    expect = expect if expect.ndim == 3 else np.repeat(expect[..., None], 3, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fractions, notes = read_tile(write(tmp_path / "fractions.tif", white))
        levels, _ = read_tile(write(tmp_path / "levels.tif", np.round(white * 255)))
    np.testing.assert_array_equal(fractions, expect)
    np.testing.assert_array_equal(levels, expect)
    assert any("[0, 1]" in n for n in notes), notes
    for name, values in (("over.tif", white * 300), ("negative.tif", white - 0.5)):
        with pytest.raises(SkipInput, match=r"outside \[0, 1\] and \[0, 255\]"):
            read_tile(write(tmp_path / name, values))
