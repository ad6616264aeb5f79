"""Slide tiles at a model's own resolution: level choice, the single-level fallback, the stream."""

import io
import os

import numpy as np
import pytest
import tifffile
from convert.pyramid_tiff import write_pyramid_tiff
from PIL import Image

from kd_histo.data import synthetic
from kd_histo.evaluation import region_reads, slide_reader

BASE_MPP = 0.25  # levels at 0.25, 0.5, 1.0, 2.0 µm/px
HR_PX, HR_MPP = 32, 0.5  # a training HR tile: 32 px at 0.5 µm/px = 64 level-0 px


def _tissue(rows: int, cols: int, tile: int = 64) -> np.ndarray:
    """H&E-like tissue blocks on the left 3 columns, glass on the rest."""
    rng = np.random.default_rng(0)
    img = np.full((rows * tile, cols * tile, 3), 245, np.uint8)
    for i in range(rows):
        for j in range(3):
            img[i * tile : (i + 1) * tile, j * tile : (j + 1) * tile] = synthetic.render_tile(
                rng, (i + j) % 4, tile
            )
    return img


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("slide") / "pyr.tif")
    return path, write_pyramid_tiff(path, _tissue(4, 6), BASE_MPP, levels=4)


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("slide") / "flat.tif")
    return path, write_pyramid_tiff(path, _tissue(4, 6), BASE_MPP, levels=1)


def test_choose_level_is_the_coarsest_not_coarser_than_wanted():
    ds = (1.0, 2.0, 4.0, 8.0003)  # scanners store downsamples a little off the powers of two
    assert [
        slide_reader.choose_level(0.25, ds, m) for m in (0.25, 0.4, 0.5, 0.97, 1.0, 2.0, 4.0)
    ] == [0, 0, 1, 1, 2, 3, 3]
    assert slide_reader.choose_level(0.25, ds, 0.1) == 0  # finer than level 0: level 0 (upsampled)
    assert slide_reader.choose_level(0.25, ds, 1.96) == 2  # 2.00 µm/px is 2% too coarse for 1.96
    assert slide_reader.choose_level(0.25, ds, 1.97) == 3  # ... and within the tolerance of 1.97


@pytest.mark.parametrize("input_px,level", [(32, 1), (16, 2), (8, 3)])
def test_each_model_reads_its_own_level_without_resizing(pyramid, input_px, level):
    path, levels = pyramid
    plan = slide_reader.plan_read(path, hr_px=HR_PX, hr_mpp=HR_MPP, input_px=input_px)
    assert (
        plan.size_l0 == 64 and plan.level == level and plan.read_px == input_px and plan.note == ""
    )
    assert plan.mpp_in == pytest.approx(HR_MPP * HR_PX / input_px) == plan.level_mpp
    assert sorted(plan.coords) == sorted((x, y) for x in (0, 64, 128) for y in (0, 64, 128, 192))
    tiles = np.concatenate(list(slide_reader.stream_batches(plan, 5, num_workers=0)))
    k = plan.coords.index((128, 64))
    # the level's own pixels: level `level` holds the area at 64 / 2**level px per tile
    s = input_px
    np.testing.assert_array_equal(tiles[k], levels[level][s : 2 * s, 2 * s : 3 * s])


def test_between_levels_reads_the_finer_one_and_resizes_the_remainder(pyramid):
    path, levels = pyramid
    plan = slide_reader.plan_read(
        path, hr_px=HR_PX, hr_mpp=HR_MPP, input_px=4
    )  # 4.0 µm/px: below level 3
    assert (plan.level, plan.read_px, plan.shrink) == (3, 8, 2.0)
    assert "no pyramid level near 4 µm/px" in plan.note and "level 3" in plan.note
    tiles = np.concatenate(list(slide_reader.stream_batches(plan, 64, num_workers=0)))
    want = np.asarray(Image.fromarray(levels[3][8:16, 16:24]).resize((4, 4), Image.BOX))
    np.testing.assert_array_equal(tiles[plan.coords.index((128, 64))], want)


def test_a_single_level_slide_is_shrunk_as_training_shrinks_and_says_so(flat):
    import tensorflow as tf

    from kd_histo.data.views import resize

    path, levels = flat
    plan = slide_reader.plan_read(path, hr_px=HR_PX, hr_mpp=HR_MPP, input_px=8)  # a student x4
    assert (plan.level, plan.read_px) == (0, 64)
    assert plan.note.endswith("reading level 0 and shrinking 8x") and "\n" not in plan.note
    tiles = np.concatenate(list(slide_reader.stream_batches(plan, 64, num_workers=0)))
    # training's LR view of the same area: the HR tile (level 0 box-filtered to 32 px), area-resized
    hr = Image.fromarray(levels[0][64:128, 128:192]).resize((HR_PX, HR_PX), Image.BOX)
    lr = resize(tf.constant(np.asarray(hr), tf.float32) / 255.0, 8, "area").numpy() * 255.0
    # two uint8 roundings apart (the stored HR tile's and ours), no more
    assert np.abs(tiles[plan.coords.index((128, 64))] - lr).max() <= 1.5


def _child_processes() -> set[int]:
    """PIDs whose parent is this process (Linux /proc)."""
    out = set()
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    out.add(int(d))
        except (OSError, IndexError, ValueError):
            continue
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_stream_keeps_order_bounds_memory_and_spawns_no_process(pyramid):
    path, _ = pyramid
    plan = slide_reader.plan_read(path, hr_px=HR_PX, hr_mpp=HR_MPP, input_px=16)
    inline = np.concatenate(list(slide_reader.stream_batches(plan, 3, num_workers=0)))
    stats = slide_reader.StreamStats()
    # Children this worker process already had (a multiprocessing resource tracker or a subprocess
    # left by an earlier test in the same pytest-xdist worker) are not the stream's.
    before = _child_processes()
    batches, children = [], set()
    for b in slide_reader.stream_batches(plan, 3, num_workers=2, window=2, stats=stats):
        children |= _child_processes() - before
        batches.append(b)
    np.testing.assert_array_equal(np.concatenate(batches), inline)  # same tiles, same order
    assert [len(b) for b in batches] == [3, 3, 3, 3]
    assert (
        stats.tiles == len(plan.coords) == 12 and stats.max_in_flight == 2
    )  # never more than the window
    assert 1 <= stats.handles_opened <= 2  # one OpenSlide handle per reader thread
    assert not children  # reader threads, no worker processes that could outlive a killed parent


def test_progress_prints_one_summary_line_when_not_a_terminal():
    out, err = io.StringIO(), io.StringIO()
    p = slide_reader.Progress("slide", 10, stream=out, bar_stream=err)
    p.update(4)
    p.update(6)
    line = p.close(", level 2")
    assert err.getvalue() == "" and out.getvalue() == line + "\n"
    assert line.startswith("slide: 10 tiles in ") and "tiles/s, level 2" in line


@pytest.mark.parametrize("input_px", [32, 16, 8, 4])  # levels 1-3 as stored, and a resize
def test_read_tiles_gives_read_tiles_bytes_of_each_tile_also_off_the_scan(pyramid, input_px):
    import dataclasses

    from kd_histo.convert import slides

    path, _ = pyramid
    plan = slide_reader.plan_read(path, hr_px=HR_PX, hr_mpp=HR_MPP, input_px=input_px)
    # the slide is 384 x 256 level-0 px: these tiles hang over its right and bottom edges, where
    # OpenSlide returns transparent pixels that read_tile turns white
    coords = list(plan.coords) + [(352, 0), (128, 224), (360, 232), (100, 37)]
    plan = dataclasses.replace(plan, coords=tuple(coords))
    slide = slides.open_slide(path)
    try:
        assert region_reads.raw_reader(slide) is not None  # the one-buffer path is taken
        got = slide_reader.read_tiles(slide, plan, plan.coords)
        want = np.stack([slide_reader.read_tile(slide, plan, x, y) for x, y in plan.coords])
    finally:
        slide.close()
    assert got.dtype == np.uint8 and got.shape == (len(coords), input_px, input_px, 3)
    np.testing.assert_array_equal(got, want)
    assert (got[-2][-1, -1] == 255).all()  # off the scan: white, as read_tile makes it


def test_read_tiles_of_a_pillow_slide_reads_tile_by_tile(tmp_path):
    from kd_histo.convert import slides

    path = str(tmp_path / "strips.tif")  # stripped, not tiled: OpenSlide refuses it, Pillow reads
    tifffile.imwrite(
        path,
        _tissue(2, 3),
        resolution=(1e4 / BASE_MPP, 1e4 / BASE_MPP),
        resolutionunit="CENTIMETER",
    )
    plan = slide_reader.plan_read(path, hr_px=HR_PX, hr_mpp=HR_MPP, input_px=16)
    slide = slides.open_slide(path)
    try:
        assert region_reads.raw_reader(slide) is None
        got = slide_reader.read_tiles(slide, plan, plan.coords)
        want = np.stack([slide_reader.read_tile(slide, plan, x, y) for x, y in plan.coords])
    finally:
        slide.close()
    np.testing.assert_array_equal(got, want)
