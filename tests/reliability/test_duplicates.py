"""Byte-identical tiles (issue 31, case 7): copies under two labels were converted unnoticed and
landed in different splits; convert now refuses them in one line (first pairs and a count) and
lists every pair in a file. Copies under one label are kept together: they land in one split."""

import json
import os

import pytest
from convert.helpers import read_split

from kd_histo.cli import convert as convert_cli

from .helpers import convert_class_tree, encoded, rgb, write, write_class_tree

pytestmark = pytest.mark.reliability


def test_identical_tiles_under_two_labels_are_refused_and_listed(tmp_path, capsys):
    src = tmp_path / "src"
    write_class_tree(src, per_class=6, px=16, seed=0)
    pairs = []
    for i in range(5):  # the same bytes as a/copy<i>.png and b/other<i>.png
        data = encoded(rgb(77 + i), "PNG")
        pairs.append(
            (write(src / "a" / f"copy{i}.png", data), write(src / "b" / f"other{i}.png", data))
        )
    out = tmp_path / "out"
    code, err = convert_class_tree(capsys, src, out)
    assert code == 2, err
    last = err.splitlines()[-1]
    assert last.startswith(f"{convert_cli.PROG}: error:") and "Traceback" not in err, err
    assert "5 " in last and pairs[0][0] in last and pairs[0][1] in last, last
    assert "a" in last and "b" in last
    assert not os.path.exists(out / "dataset.json")
    listed = out / "conflicting_duplicates.csv"
    assert str(listed) in last
    rows = listed.read_text().splitlines()
    assert rows[0] == "path,label,same_bytes_as,its_label" and len(rows) == 6, rows
    assert {tuple(r.split(",")[::2]) for r in rows[1:]} == set(pairs)
    # removing the copies (the fix the line asks for) converts
    for _, other in pairs:
        os.remove(other)
    code, err = convert_class_tree(capsys, src, out)
    assert code == 0, err


def test_identical_tiles_under_one_label_land_in_one_split(tmp_path, capsys):
    src = tmp_path / "src"
    write_class_tree(src, per_class=12, px=16, seed=0)
    copies = []
    for i in range(8):  # 8 pairs of copies in class a, under names of their own
        data = encoded(rgb(500 + i), "PNG")
        copies.append((write(src / "a" / f"x{i}.png", data), write(src / "a" / f"y{i}.png", data)))
    out = tmp_path / "out"
    code, err = convert_class_tree(capsys, src, out)
    assert code == 0, err
    split_of = {}
    for split in json.loads((out / "dataset.json").read_text())["counts"]:
        for r in read_split(str(out), split):
            split_of[r["source"].decode()] = split
    assert all(x in split_of and y in split_of for x, y in copies), sorted(split_of)
    assert [split_of[x] == split_of[y] for x, y in copies] == [True] * 8, split_of
