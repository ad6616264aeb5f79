"""Rows of tiles read in one OpenSlide call where that gives each tile's own bytes, only there."""

import dataclasses

import numpy as np
import pytest
from convert.pyramid_tiff import tissue_blocks, write_pyramid_tiff

from kd_histo.convert import slides
from kd_histo.evaluation import region_reads, slide_reader

BASE_MPP = 0.25
HR_PX, HR_MPP = 32, 0.5  # a tile: 64 level-0 px


def _tissue(height: int, width: int) -> np.ndarray:
    return tissue_blocks(height, width, seed=1, glass=240)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """384 x 256 px: levels at exactly 1, 2, 4, 8x (every tile on whole level pixels)."""
    path = str(tmp_path_factory.mktemp("slide") / "whole.tif")
    write_pyramid_tiff(path, _tissue(256, 384), BASE_MPP, levels=4)
    return path


@pytest.fixture(scope="module")
def rounded(tmp_path_factory):
    """391 x 263 px: level sizes rounded down, so OpenSlide's downsamples are 2.006x, 4.03x."""
    path = str(tmp_path_factory.mktemp("slide") / "rounded.tif")
    write_pyramid_tiff(path, _tissue(263, 391), BASE_MPP, levels=3)
    return path


def _per_tile(slide, plan) -> np.ndarray:
    return np.stack([slide_reader.read_tile(slide, plan, x, y) for x, y in plan.coords])


def test_whole_downsample():
    assert [region_reads.whole_downsample(d) for d in (1.0, 2.0, 8.0)] == [1, 2, 8]
    assert [region_reads.whole_downsample(d) for d in (2.0003, 8.000449, 0.5, 1.5)] == [0] * 4


def test_runs_join_abutting_tiles_of_one_row_on_whole_level_pixels():
    grid = [(0, 0), (64, 0), (128, 0), (0, 64), (64, 64), (192, 64), (256, 64)]
    kw = dict(size_l0=64, read_px=32)
    assert region_reads.runs(grid, downsample=2.0, **kw) == [(0, 3), (3, 2), (5, 2)]
    # at most max_px level pixels a call
    assert region_reads.runs(grid, downsample=2.0, max_px=64, **kw) == [
        (0, 2),
        (2, 1),
        (3, 2),
        (5, 2),
    ]
    singles = [(i, 1) for i in range(len(grid))]
    # a fractional downsample: each tile at its own sub-pixel offset, read alone
    assert region_reads.runs(grid, downsample=2.0003, **kw) == singles
    # a tile side that is not read_px whole level pixels (a shrink remainder), or off the pixels
    assert region_reads.runs(grid, downsample=2.0, size_l0=64, read_px=31) == singles
    odd = [(1, 0), (65, 0), (129, 0)]
    assert region_reads.runs(odd, downsample=2.0, **kw) == [(0, 1), (1, 1), (2, 1)]
    assert region_reads.runs(odd, downsample=1.0, size_l0=64, read_px=64) == [(0, 3)]
    assert region_reads.runs([], downsample=2.0, **kw) == []


@pytest.mark.parametrize("input_px", [32, 16, 8, 4])  # levels 1-3 as stored, and a resize
def test_rows_are_read_in_one_call_and_give_each_tiles_own_bytes(whole, input_px):
    plan = slide_reader.plan_read(
        whole, hr_px=HR_PX, hr_mpp=HR_MPP, input_px=input_px, min_tissue=0.0
    )
    assert len(plan.coords) == 24  # 6 x 4 tiles of 64 level-0 px
    stats = slide_reader.StreamStats()
    got = np.concatenate(list(slide_reader.stream_batches(plan, 64, num_workers=0, stats=stats)))
    assert stats.region_reads == 4  # one call a row
    slide = slides.open_slide(whole)
    try:
        np.testing.assert_array_equal(got, _per_tile(slide, plan))
    finally:
        slide.close()
    # batches cut rows: 5 tiles a batch -> rows of 5 | 1+4 | 2+3 | 3+2 | 4 -> 1+2+2+2+1 calls
    stats = slide_reader.StreamStats()
    again = np.concatenate(
        list(slide_reader.stream_batches(plan, 5, num_workers=2, window=2, stats=stats))
    )
    np.testing.assert_array_equal(again, got)
    assert stats.region_reads == 8


def test_a_row_hanging_off_the_scan_gives_read_tiles_white(whole):
    plan = slide_reader.plan_read(whole, hr_px=HR_PX, hr_mpp=HR_MPP, input_px=16, min_tissue=0)
    # 384 px wide: (384, 0) lies off the scan (transparent pixels, re-read by read_tile)
    plan = dataclasses.replace(plan, coords=((256, 0), (320, 0), (384, 0)))
    slide = slides.open_slide(whole)
    try:
        got, calls = slide_reader._read_tiles(slide, plan, plan.coords)
        want = _per_tile(slide, plan)
    finally:
        slide.close()
    assert calls == 2  # the row in one call, the transparent tile again on its own
    np.testing.assert_array_equal(got, want)
    assert (got[2] == 255).all()


@pytest.mark.parametrize("input_px", [32, 16])
def test_levels_at_fractional_downsamples_are_read_tile_by_tile(rounded, input_px):
    plan = slide_reader.plan_read(
        rounded, hr_px=HR_PX, hr_mpp=HR_MPP, input_px=input_px, min_tissue=0.0
    )
    slide = slides.open_slide(rounded)
    try:
        ds = slide.level_downsamples[plan.level]
        assert region_reads.whole_downsample(ds) == 0  # 2.006x / 4.03x
        got, calls = slide_reader._read_tiles(slide, plan, plan.coords)
        np.testing.assert_array_equal(got, _per_tile(slide, plan))
    finally:
        slide.close()
    assert calls == len(plan.coords)


@pytest.mark.realdata
@pytest.mark.parametrize("input_px", [224, 28])  # the teacher, and a student x8 (shrunk)
def test_real_svs_rows_give_each_tiles_own_bytes(shared_data, input_px):
    svs = str(shared_data / "slides" / "CMU-1-Small-Region.svs")
    plan = slide_reader.plan_read(svs, hr_px=224, hr_mpp=0.5, input_px=input_px, min_tissue=0.0)
    stats = slide_reader.StreamStats()
    got = np.concatenate(list(slide_reader.stream_batches(plan, 64, num_workers=2, stats=stats)))
    assert stats.region_reads < len(plan.coords) / 4  # single-level: rows of level-0 tiles
    slide = slides.open_slide(svs)
    try:
        np.testing.assert_array_equal(got, _per_tile(slide, plan))
    finally:
        slide.close()
