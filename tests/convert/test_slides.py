"""Whole-slide conversion: a pyramidal TIFF made here (3 levels) and the real Aperio slide."""

import numpy as np
import openslide
import pytest

from kd_histo import schema
from kd_histo.convert import ConvertConfig, EncodeOptions, convert, slides
from kd_histo.data import synthetic

from .helpers import decode, read_split
from .pyramid_tiff import write_pyramid_tiff

BASE_MPP = 0.25
# The test slide is 64 x 96 µm: all its tissue is below the default speck area (10,000 µm²).
SMALL_SPECKS = 100.0


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """A 256x384 px slide at 0.25 µm/px: H&E-like tissue on the left 192 px, glass on the right."""
    rng = np.random.default_rng(0)
    img = np.full((256, 384, 3), 245, np.uint8)
    for i in range(4):
        for j in range(3):
            img[i * 64 : (i + 1) * 64, j * 64 : (j + 1) * 64] = synthetic.render_tile(
                rng, (i + j) % 4, 64
            )
    path = str(tmp_path_factory.mktemp("slide") / "pyr.tif")
    levels = write_pyramid_tiff(path, img, BASE_MPP, levels=3)
    return path, levels


def test_streamed_thumbnail_matches_a_whole_level_read(pyramid):
    path, levels = pyramid
    s = openslide.OpenSlide(path)
    whole = slides.thumbnail(s, thumb_px=96, block_px=10_000)
    blocks = slides.thumbnail(s, thumb_px=96, block_px=40)  # many blocks
    assert whole.shape == (64, 96, 3)
    assert np.abs(whole.astype(int) - blocks).max() <= 1  # block edges round to the same box filter
    np.testing.assert_array_equal(slides.thumbnail(s, thumb_px=96, block_px=10_000), levels[2])


def test_plan_keeps_only_tissue_tiles(pyramid):
    path, _ = pyramid
    plan = slides.plan_slide(path, 32, 0.5, min_tissue=0.5)  # 32 px at 0.5 µm/px = 64 level-0 px
    assert plan.base_mpp == pytest.approx(BASE_MPP) and plan.size_l0 == 64
    assert plan.grid_tiles == 4 * 6
    assert sorted(plan.coords) == sorted((x, y) for x in (0, 64, 128) for y in (0, 64, 128, 192))


def test_region_is_read_from_the_matching_pyramid_level(pyramid):
    path, levels = pyramid
    s = openslide.OpenSlide(path)
    # 1.0 µm/px = downsample 4 = level 2: the real level-2 pixels, not a resize of level 0.
    assert slides.level_for(s, 128, 32) == 2
    got = slides.read_region_rgb(s, 128, 64, 128, 32)
    np.testing.assert_array_equal(got, levels[2][16:48, 32:64])
    # Between levels (downsample 3 wanted): read the finer level 1 and box-filter, never upsample.
    assert slides.level_for(s, 96, 32) == 1


def test_slide_converts_with_aligned_lr_tiles_from_lower_level(pyramid, tmp_path):
    path, levels = pyramid
    enc = EncodeOptions(tile_px=32, target_mpp=0.5, lr_factor=2, min_tissue_area=SMALL_SPECKS)
    info = convert(
        ConvertConfig(out_dir=str(tmp_path), slides=(path,), encode=enc, class_names=("tissue",))
    )
    assert info.lr_factor == 2.0 and info.mpp == 0.5 and info.tile_px == 32
    recs = read_split(str(tmp_path), "unlabeled")
    assert len(recs) == 12 == info.counts["unlabeled"]["unlabeled"]
    for r in recs:
        x, y = r["x"], r["y"]
        assert (
            r["label"] == schema.UNLABELED
            and r["lr_factor"] == 2.0
            and r["mpp"] == pytest.approx(0.5)
        )
        np.testing.assert_array_equal(
            decode(r["image"]), levels[1][y // 2 : y // 2 + 32, x // 2 : x // 2 + 32]
        )
        np.testing.assert_array_equal(
            decode(r["lr_image"]), levels[2][y // 4 : y // 4 + 16, x // 4 : x // 4 + 16]
        )


@pytest.mark.realdata
def test_real_svs_converts_tissue_tiles_with_flat_reads(shared_data, tmp_path, monkeypatch):
    svs = str(shared_data / "slides" / "CMU-1-Small-Region.svs")
    biggest = []
    real_read = openslide.OpenSlide.read_region

    def spy(self, location, level, size):
        biggest.append(size[0] * size[1])
        return real_read(self, location, level, size)

    monkeypatch.setattr(openslide.OpenSlide, "read_region", spy)
    counts = {}
    for mpp in (0.5, 1.0):
        out = tmp_path / str(mpp)
        info = convert(
            ConvertConfig(
                out_dir=str(out),
                slides=(svs,),
                # The fixed rule, re-checked on every tile as read (asserted below); Otsu's
                # conversion of this slide is tests/convert/test_tissue_qc.py's.
                encode=EncodeOptions(tile_px=224, target_mpp=mpp, tissue_method="threshold"),
                class_names=("tissue",),
            )
        )
        recs = read_split(str(out), "unlabeled")
        counts[mpp] = len(recs)
        assert len(recs) == info.counts["unlabeled"]["unlabeled"] > 0
        plan = slides.plan_slide(svs, 224, mpp)
        assert len(recs) < plan.grid_tiles  # background tiles were dropped
        for r in recs:
            assert slides.is_tissue(decode(r["image"])).mean() >= 0.5
    assert counts[0.5] > counts[1.0]
    # Streaming: the thumbnail is read in blocks of at most 2048^2 px and tiles one at a time, so
    # no read ever approaches the slide's 2220 x 2967 px; smaller blocks bound it further.
    assert max(biggest) <= 2048 * 2048
    biggest.clear()
    slides.plan_slide(svs, 224, 0.5, block_px=256)
    assert max(biggest) <= 256 * 256


def test_slide_labels_csv_gives_label_patient_and_split(pyramid, tmp_path):
    path, _ = pyramid
    labels = tmp_path / "slides.csv"
    labels.write_text(f"path,label,slide_id,patient_id,split\n{path},tumour,S1,P1,test\n")
    info = convert(
        ConvertConfig(
            out_dir=str(tmp_path / "out"),
            slide_labels=str(labels),
            encode=EncodeOptions(tile_px=32, target_mpp=0.5, min_tissue_area=SMALL_SPECKS),
            allow_one_class=True,  # a test cohort of one diagnosis
        )
    )
    assert info.class_names == ["tumour"] and info.counts == {"test": {"tumour": 12}}
    recs = read_split(str(tmp_path / "out"), "test")
    assert {(r["label"], r["slide_id"], r["patient_id"]) for r in recs} == {(0, b"S1", b"P1")}
    assert len({(r["x"], r["y"]) for r in recs}) == 12  # tile coordinates kept, one per tile
