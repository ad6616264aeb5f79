"""Conversion inputs that once gave a wrong data set or an error naming no file: a manifest
header with a misspelt column (every label silently dropped), and a file name that is not UTF-8."""

import json
import os

import pytest

from kd_histo.cli import convert as convert_cli
from kd_histo.cli import flags_common as fc

from .helpers import encoded, rgb, write

pytestmark = pytest.mark.reliability

ARGS = ["--tile_px=16", "--num_workers=0", "--progress=false", "--split_fractions=0.5,0.25,0.25"]


def _convert(capsys, *argv) -> tuple[int, str]:
    code = fc.invoke(convert_cli.PROG, convert_cli.main, [*argv, *ARGS])
    return code, capsys.readouterr().err.strip()


def _tiles(folder, classes=("a", "b"), per_class=4) -> list[tuple[str, str]]:
    rows = []
    for c in classes:
        for i in range(per_class):
            rel = f"{c}/t{i}.png"
            write(os.path.join(folder, rel), encoded(rgb(len(rows)), "PNG"))
            rows.append((rel, c))
    return rows


@pytest.mark.parametrize("header", ["path,Label", "path,label,slideid", "path,lable,split"])
def test_manifest_with_an_unknown_column_is_refused(tmp_path, capsys, header):
    rows = _tiles(tmp_path / "src")
    manifest = tmp_path / "src" / "manifest.csv"
    manifest.write_text(
        header
        + "\n"
        + "".join(f"{p},{c}{',' if header.count(',') == 2 else ''}\n" for p, c in rows)
    )
    code, err = _convert(capsys, f"--manifest={manifest}", f"--out_dir={tmp_path / 'out'}")
    assert code == 2, err
    assert err.startswith("kd-histo-convert: error:") and "\n" not in err
    unknown = [c for c in header.split(",") if c not in ("path", "label", "split")]
    assert all(repr(c) in err for c in unknown), err
    assert not os.path.exists(tmp_path / "out" / "dataset.json")
    # the fixed header (the original command, rerun) converts with every label
    manifest.write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    code, err = _convert(capsys, f"--manifest={manifest}", f"--out_dir={tmp_path / 'out'}")
    assert code == 0, err
    info = json.load(open(tmp_path / "out" / "dataset.json"))
    assert info["class_names"] == ["a", "b"] and "unlabeled" not in info["counts"]


def test_file_name_that_is_not_utf8_is_skipped_and_named(tmp_path, capsys):
    src = tmp_path / "src"
    _tiles(src)
    bad = os.path.join(os.fsencode(src / "a"), b"caf\xe9.png")  # Latin-1 e-acute: not UTF-8
    with open(bad, "wb") as f:
        f.write(encoded(rgb(99), "PNG"))
    out = tmp_path / "out"
    code, err = _convert(capsys, f"--input_dir={src}", f"--out_dir={out}")
    assert code == 0, err
    info = json.load(open(out / "dataset.json"))
    assert sum(sum(c.values()) for c in info["counts"].values()) == 8  # the 8 good tiles
    skipped = [s for s in info["skipped"] if "caf" in s["path"]]
    assert len(skipped) == 1 and "UTF-8" in skipped[0]["reason"], info["skipped"]
    assert "\\xe9" in skipped[0]["path"]  # the name as its bytes, printable
