"""A level's own pixels where OpenSlide would resample them (rounded level sizes), OpenSlide's bytes
where it would not, and OpenSlide itself wherever this reader cannot be exact."""

import types

import numpy as np
import pytest
import tifffile
from convert.pyramid_tiff import tissue_blocks, write_pyramid_tiff
from PIL import Image

from kd_histo.convert import slides
from kd_histo.evaluation import level_pixels, slide_reader
from kd_histo.evaluation.slide_predict import tiles_per_batch, warm_up

BASE_MPP = 0.25
HR_PX, HR_MPP = 32, 0.5  # a tile: 64 level-0 px


def _tissue(height: int, width: int) -> np.ndarray:
    return tissue_blocks(height, width, seed=2, glass=235)


@pytest.fixture(scope="module")
def rounded(tmp_path_factory):
    """391 x 263 px: level sizes rounded down (195 x 131, 97 x 65), OpenSlide's downsamples
    2.006x and 4.03x; returns (path, level images)."""
    path = str(tmp_path_factory.mktemp("slide") / "rounded.tif")
    return path, write_pyramid_tiff(path, _tissue(263, 391), BASE_MPP, levels=3)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """384 x 256 px: levels at exactly 2x and 4x."""
    path = str(tmp_path_factory.mktemp("slide") / "whole.tif")
    return path, write_pyramid_tiff(path, _tissue(256, 384), BASE_MPP, levels=3)


def test_whole_shrink_accepts_sizes_rounded_either_way_only():
    assert level_pixels.whole_shrink((17760, 17802), (2220, 2225)) == 8  # vips: rounded down
    assert level_pixels.whole_shrink((391, 263), (196, 132)) == 2  # rounded up
    assert level_pixels.whole_shrink((1000, 1000), (1000, 1000)) == 1
    assert level_pixels.whole_shrink((1000, 1000), (300, 300)) == 0  # 3.33x: no whole shrink
    assert level_pixels.whole_shrink((1000, 1000), (500, 480)) == 0  # width 2x, height not
    assert level_pixels.whole_shrink((1000, 1000), (0, 10)) == 0


@pytest.mark.parametrize("input_px,level,d", [(32, 1, 2), (16, 2, 4)])
def test_rounded_levels_are_read_as_their_own_pixels(rounded, input_px, level, d):
    path, images = rounded
    plan = slide_reader.plan_read(path, hr_px=HR_PX, hr_mpp=HR_MPP, input_px=input_px)
    assert plan.level == level and plan.read_px == input_px
    stats = slide_reader.StreamStats()
    got = np.concatenate(list(slide_reader.stream_batches(plan, 5, num_workers=2, stats=stats)))
    assert stats.level_pixels and stats.region_reads == 0  # no OpenSlide read
    img, r = images[level], input_px
    for (x, y), tile in zip(plan.coords, got):
        want = np.full((r, r, 3), 255, np.uint8)  # off the level: white
        part = img[y // d : y // d + r, x // d : x // d + r]
        want[: part.shape[0], : part.shape[1]] = part
        np.testing.assert_array_equal(tile, want)
    # what OpenSlide gives there: the same tissue, resampled at a drifting sub-pixel offset
    slide = slides.open_slide(path)
    try:
        theirs = np.stack([slide_reader.read_tile(slide, plan, x, y) for x, y in plan.coords])
    finally:
        slide.close()
    assert not np.array_equal(theirs, got)
    assert np.abs(theirs.astype(int) - got).mean() < 20


def test_a_tile_off_the_whole_pixels_moves_to_the_nearest_and_hangs_off_in_white(rounded):
    path, images = rounded
    reader = level_pixels.open_level(path, 1)  # d = 2
    try:
        out = np.zeros((8, 8, 3), np.uint8)
        reader.read_into(out, 3, 5)  # level pixel (1.5, 2.5): rounded half up to (2, 3)
        np.testing.assert_array_equal(out, images[1][3:11, 2:10])
        reader.read_into(out, 2 * 190, -4)  # 195 x 131 level: 3 columns and 2 rows off it
        np.testing.assert_array_equal(out[2:, :5], images[1][0:6, 190:195])
        assert (out[:2] == 255).all() and (out[:, 5:] == 255).all()
    finally:
        reader.close()


def test_where_openslide_reads_exactly_it_keeps_reading_and_the_bytes_agree(whole):
    path, images = whole
    plan = slide_reader.plan_read(path, hr_px=HR_PX, hr_mpp=HR_MPP, input_px=16, min_tissue=0)
    assert level_pixels.open_level(path, plan.level) is None  # 4.0 exactly: OpenSlide's own
    stats = slide_reader.StreamStats()
    theirs = np.concatenate(list(slide_reader.stream_batches(plan, 64, stats=stats)))
    assert not stats.level_pixels and stats.region_reads > 0
    with tifffile.TiffFile(path) as tif:
        page = level_pixels._page_of(tif.pages[plan.level])
    mine = level_pixels.LevelPixels(path, page, 4)  # this reader on the same level anyway
    try:
        np.testing.assert_array_equal(mine.read_tiles(plan.coords, 16), theirs)
    finally:
        mine.close()


def test_a_decoder_that_disagrees_with_openslide_leaves_the_slide_to_it(rounded, monkeypatch):
    path, _ = rounded
    decode = level_pixels._Page.decode
    monkeypatch.setattr(level_pixels._Page, "decode", lambda self, data: decode(self, data) ^ 1)
    assert level_pixels.open_level(path, 1) is None
    plan = slide_reader.plan_read(path, hr_px=HR_PX, hr_mpp=HR_MPP, input_px=32)
    stats = slide_reader.StreamStats()
    list(slide_reader.stream_batches(plan, 64, stats=stats))
    assert not stats.level_pixels and stats.region_reads == len(plan.coords)


def test_a_damaged_stored_tile_is_one_line_naming_the_slide(rounded, monkeypatch):
    path, _ = rounded
    reader = level_pixels.open_level(path, 1)
    try:
        reader._cache.clear()

        def broken(self, data):
            raise ValueError("bad JPEG")

        monkeypatch.setattr(level_pixels._Page, "decode", broken)
        with pytest.raises(ValueError, match=r"rounded\.tif: cannot read the tile at level-0 "):
            reader.read_into(np.zeros((8, 8, 3), np.uint8), 64, 64)
    finally:
        reader.close()


def test_a_compression_not_read_here_is_left_to_openslide(tmp_path):
    path = str(tmp_path / "deflate.tif")  # deflate tiles, level sizes rounded: 2.006x
    img = _tissue(263, 391)
    small = np.asarray(Image.fromarray(img).resize((195, 131), Image.BOX))
    res = dict(resolution=(1e4 / BASE_MPP, 1e4 / BASE_MPP), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as tif:
        tif.write(img, tile=(64, 64), compression="zlib", photometric="rgb", **res)
        tif.write(small, tile=(64, 64), compression="zlib", photometric="rgb", subfiletype=1)
    slide = slides.open_slide(path)
    try:
        assert slide.level_dimensions[1] == (195, 131)  # OpenSlide reads it, resampling level 1
    finally:
        slide.close()
    assert level_pixels.open_level(path, 1) is None


@pytest.mark.realdata
def test_real_aperio_jpeg_tiles_decode_to_openslides_bytes(shared_data):
    svs = str(shared_data / "slides" / "CMU-1-Small-Region.svs")  # JPEG tiles, photometric RGB
    with tifffile.TiffFile(svs) as tif:
        page = level_pixels._page_of(tif.pages[0])
    assert page is not None and page.raw_rgb
    slide = slides.open_slide(svs)
    reader = level_pixels.LevelPixels(svs, page, 1)
    try:
        assert reader._agrees_with(slide)
        # and across tile borders, anywhere: level 0 is read exactly by OpenSlide too
        for x, y in ((0, 0), (230, 470), (1000, 2000)):
            want = np.asarray(slide.read_region((x, y), 0, (60, 60)).convert("RGB"))
            got = np.empty((60, 60, 3), np.uint8)
            reader.read_into(got, x, y)
            np.testing.assert_array_equal(got, want)
    finally:
        reader.close()
        slide.close()


def test_warm_up_calls_the_model_once_on_a_blank_batch_of_a_slides_size():
    calls = []

    def classify(images):
        calls.append((images.shape, images.dtype, int(images.max())))
        return np.zeros((len(images), 2), np.float32), None

    warm_up(classify, types.SimpleNamespace(hr_px=224, input_px=28), 32)  # a student x8's run
    assert calls == [((tiles_per_batch(32, 224, 28), 28, 28, 3), np.uint8, 0)]
