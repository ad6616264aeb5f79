"""Groups from the user (--groups CSV), near-duplicate groups in a conversion, the leakage check."""

import os
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from kd_histo.convert import ConversionError, ConvertConfig, EncodeOptions, ManifestError, convert
from kd_histo.convert import groups as groups_lib

from .helpers import read_split, write_image


def _texture(seed, px=48):
    rng = np.random.default_rng(seed)
    noise = Image.fromarray(rng.integers(0, 256, (px, px), dtype=np.uint8))
    g = np.asarray(noise.filter(ImageFilter.GaussianBlur(2)), np.float32)
    g = (g - g.mean()) / g.std()
    return np.clip(128 + 50 * g[..., None] * rng.uniform(0.5, 1.0, 3), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """2 classes x 4 originals x 4 copies (flips, 90-degree turns): 32 tiles of 48 px."""
    root = tmp_path_factory.mktemp("copies")
    for c in ("a", "b"):
        for k in range(4):
            img = _texture(10 * (c == "b") + k)
            for j, t in enumerate((img, img[:, ::-1], np.rot90(img), img[::-1])):
                write_image(root / "in" / c / f"{c}{k}_{j}.png", np.ascontiguousarray(t))
    return root


def _splits(out):
    return {
        r["source"].decode(): (s, r["slide_id"].decode())
        for s in ("train", "val", "test")
        for r in read_split(str(out), s)
    }


def test_groups_csv_keeps_each_group_in_one_split(copies, tmp_path):
    os.makedirs(tmp_path / "meta")
    lines = ["path,group_id"] + [
        f"{c}/{c}{k}_{j}.png,{c}-orig{k}" for c in "ab" for k in range(4) for j in range(4)
    ]
    (tmp_path / "meta" / "groups.csv").write_text("\n".join(lines) + "\n")
    info = convert(
        ConvertConfig(
            out_dir=str(tmp_path / "out"),
            input_dir=str(copies / "in"),  # the CSV's paths are relative to the input folder
            groups=str(tmp_path / "meta" / "groups.csv"),
            fractions=(0.5, 0.25, 0.25),
            encode=EncodeOptions(tile_px=48),
        )
    )
    got = _splits(tmp_path / "out")
    assert len(got) == 32
    by_group = {}
    for path, (split, slide) in got.items():
        name = os.path.basename(path)
        assert slide == f"group:{name[0]}-orig{name[1]}"
        by_group.setdefault(slide, set()).add(split)
    assert all(len(v) == 1 for v in by_group.values()) and len(by_group) == 8
    assert any(n.startswith("groups from") and "32 tiles in 8 groups" in n for n in info.notes)
    check = next(n for n in info.notes if n.startswith("leakage check"))
    assert "0 of 8 test tiles (0.0%) have a near-copy in train" in check


def test_groups_csv_errors(copies, tmp_path):
    bad = tmp_path / "groups.csv"
    bad.write_text("path,group_id\na/a0_0.png,g1\n")
    cfg = ConvertConfig(out_dir=str(tmp_path / "o"), input_dir=str(copies / "in"), groups=str(bad))
    with pytest.raises(
        ManifestError, match=r"31 tile inputs are not in --groups=.*list every tile"
    ):
        convert(cfg)
    with pytest.raises(ConversionError, match="--groups gives the groups; drop --group_by=phash"):
        convert(
            ConvertConfig(
                out_dir=str(tmp_path / "p"),
                input_dir=str(copies / "in"),
                groups=str(bad),
                group_by="phash",
            )
        )
    bad.write_text("path,group\na/a0_0.png,g1\n")
    with pytest.raises(ManifestError, match="'path' and 'group_id' columns"):
        convert(cfg)


def test_split_by_file_leaks_copies_and_near_duplicate_groups_do_not(copies, tmp_path):
    by_file = convert(
        ConvertConfig(
            out_dir=str(tmp_path / "file"),
            input_dir=str(copies / "in"),
            fractions=(0.5, 0.25, 0.25),
            encode=EncodeOptions(tile_px=48),
        )  # fmt: skip
    )
    check = next(n for n in by_file.notes if n.startswith("leakage check"))
    leaked = int(re.search(r"(\d+) of \d+ test tiles", check).group(1))
    assert leaked > 0  # one pseudo-slide per file: copies of one original on both sides
    info = convert(
        ConvertConfig(
            out_dir=str(tmp_path / "nd"),
            input_dir=str(copies / "in"),
            group_by="near_duplicates",
            fractions=(0.5, 0.25, 0.25),
            encode=EncodeOptions(tile_px=48),
        )  # fmt: skip
    )
    got = _splits(tmp_path / "nd")
    orig = {}
    for path, (split, slide) in got.items():
        orig.setdefault(os.path.basename(path)[:2], set()).add((split, slide))
    assert all(len(v) == 1 for v in orig.values())  # all 4 copies: one group, one split
    assert any("32 tiles in 8 near-duplicate groups" in n for n in info.notes)
    assert "0 of 8 test tiles (0.0%)" in next(
        n for n in info.notes if n.startswith("leakage check")
    )


def test_leakage_counts_links_to_training_tiles():
    splits = ["train", "test", "val", "test", "unlabeled", "test", ""]
    leak = groups_lib.leakage(splits, [(0, 1), (2, 3), (4, 5), (6, 3)])
    assert leak.with_copy_in_train == {"val": 0, "test": 1}
    assert leak.with_copy_in_training == {"val": 0, "test": 2}
    assert leak.totals == {"val": 1, "test": 3}
    assert leak.line().startswith(
        "leakage check: 0 of 1 val tiles (0.0%) have a near-copy in train"
    )
    assert (
        "1 of 3 test tiles (33.3%) have a near-copy in train (2 in train or unlabeled)"
        in leak.line()
    )
