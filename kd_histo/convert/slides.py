"""Whole-slide images through OpenSlide: tissue mask, tile grid at a target µm/px, streamed reads.

Planning (:func:`plan_slide`) opens the slide, detects tissue on a thumbnail read in blocks
(:mod:`kd_histo.convert.tissue`: Otsu's threshold or the fixed rule) and lists the level-0
corners of grid tiles covering enough tissue. Reading
(:func:`read_region_rgb`) fetches one tile at a time from the coarsest pyramid level that is not
coarser than needed, so memory stays flat however big the slide is: no level-0 image is ever
loaded. The optional low-resolution view is read the same way at ``lr_factor`` times the µm/px,
i.e. from the slide's own lower-magnification level when the pyramid has one.

This module does not encode or write tiles and does not choose splits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import numpy as np
from PIL import Image

from kd_histo.convert import tissue
from kd_histo.convert.errors import ConversionError, SkipInput
from kd_histo.convert.tissue import is_tissue


@dataclasses.dataclass(frozen=True)
class SlidePlan:
    """The tiles to read from one slide."""

    path: str
    base_mpp: float  # level-0 µm/px
    size_l0: int  # tile side in level-0 pixels
    coords: tuple[tuple[int, int], ...]  # level-0 (x, y) of each tissue tile, row-major
    grid_tiles: int  # tiles in the grid before background was dropped
    dims: tuple[int, int] = (0, 0)  # level-0 width, height
    tissue_method: str = "threshold"
    tissue_threshold: int = 0  # chroma above which a thumbnail pixel is tissue
    tissue_fraction: float = 0.0  # share of the thumbnail that is tissue
    # The thumbnail (uint8 RGB), kept only when asked for (the qc picture); not compared.
    thumbnail: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)


def open_slide(path: str):
    """Opens a slide with OpenSlide; unreadable files raise :class:`SkipInput`."""
    import openslide

    try:
        return openslide.OpenSlide(path)
    except (openslide.OpenSlideError, OSError) as e:
        fallback = _pillow_slide(path)
        if fallback is not None:
            return fallback
        raise SkipInput(
            "not a readable whole-slide image: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def _pillow_slide(path: str):
    """A single-image TIFF that OpenSlide does not open (stripped, not tiled: as an image editor
    saves a region) read through Pillow as an ``openslide.ImageSlide``, with its TIFF resolution
    in centimetres as OpenSlide reports it; None for other files, other pixel modes, or more
    pixels than a tile reader would decode (``tiles.DEFAULT_MAX_PIXELS``)."""
    from kd_histo.convert.tiles import DEFAULT_MAX_PIXELS

    if os.path.splitext(path)[1].lower() not in (".tif", ".tiff"):
        return None
    try:
        with Image.open(path) as img:
            if img.mode not in ("RGB", "RGBA", "L") or math.prod(img.size) > DEFAULT_MAX_PIXELS:
                return None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return _pillow_slide_class()(path)


@functools.cache
def _pillow_slide_class():
    import openslide

    class PillowSlide(openslide.ImageSlide):
        @property
        def properties(self):
            tags = getattr(self._image, "tag_v2", {})
            if tags.get(296) == 3 and tags.get(282):  # ResolutionUnit centimetre, XResolution
                return {
                    "tiff.XResolution": str(float(tags[282])),
                    "tiff.ResolutionUnit": "centimeter",
                }
            return {}

    return PillowSlide


MPP_RANGE = (0.01, 100.0)  # level-0 µm/px of any scanner or camera (a 40x scan: 0.25)


def _plausible(mpp: float, source: str) -> float:
    """``mpp`` when it is a level-0 µm/px a slide can have; else one line naming ``source``."""
    lo, hi = MPP_RANGE
    if not lo <= mpp <= hi:  # also NaN
        raise ConversionError(
            f"{source} gives level-0 µm/px {mpp:.3g}, outside {lo:g}-{hi:g}; "
            "pass the slide's real value with --slide_mpp=<level-0 µm/px>"
        )
    return mpp


def slide_size(path: str) -> tuple[int, int]:
    """Level-0 (width, height) of a slide; unreadable files raise :class:`SkipInput`."""
    slide = open_slide(path)
    try:
        return tuple(slide.dimensions)
    finally:
        slide.close()


def base_mpp_of(slide, override: float = 0.0) -> float:
    """Level-0 µm/px from the slide's metadata, or ``override`` when > 0 (both checked to lie in
    :data:`MPP_RANGE`)."""
    if override > 0:
        return _plausible(override, "--slide_mpp")
    for key in ("openslide.mpp-x", "tiff.XResolution"):
        value = slide.properties.get(key)
        if value:
            mpp = float(value)
            if key == "tiff.XResolution":  # pixels per unit; only centimetres are unambiguous
                if slide.properties.get("tiff.ResolutionUnit") != "centimeter" or mpp <= 0:
                    continue
                mpp = 1e4 / mpp
            if mpp > 0:
                return _plausible(mpp, f"its metadata ({key})")
    raise ConversionError(
        "the slide has no µm/px in its metadata; pass --slide_mpp=<level-0 µm/px>"
    )


def thumbnail(slide, thumb_px: int = 1024, block_px: int = 2048) -> np.ndarray:
    """A uint8 RGB thumbnail (longest side about ``thumb_px``) read in blocks.

    OpenSlide's own ``get_thumbnail`` reads a whole level at once, which for a single-level slide is
    the full level-0 image; here no read exceeds ``block_px`` x ``block_px`` pixels, so memory stays
    flat however big the slide is.
    """
    width, height = slide.dimensions
    level = slide.get_best_level_for_downsample(max(width, height) / thumb_px)
    lw, lh = slide.level_dimensions[level]
    level_ds = slide.level_downsamples[level]
    f = max(1.0, max(lw, lh) / thumb_px)  # level px per thumbnail px
    tw, th = max(1, int(round(lw / f))), max(1, int(round(lh / f)))
    out = np.full((th, tw, 3), 255, np.uint8)
    step = max(1, int(block_px // f))  # thumbnail px per block
    for oy in range(0, th, step):
        for ox in range(0, tw, step):
            oy1, ox1 = min(th, oy + step), min(tw, ox + step)
            ly0, lx0 = int(round(oy * f)), int(round(ox * f))
            ly1, lx1 = (
                min(lh, max(ly0 + 1, int(round(oy1 * f)))),
                min(lw, max(lx0 + 1, int(round(ox1 * f)))),
            )
            region = slide.read_region(
                (int(lx0 * level_ds), int(ly0 * level_ds)), level, (lx1 - lx0, ly1 - ly0)
            )
            rgb = _flatten(region)
            out[oy:oy1, ox:ox1] = np.asarray(
                Image.fromarray(rgb).resize((ox1 - ox, oy1 - oy), Image.BOX)
            )
    return out


def tissue_mask(slide, thumb_px: int = 1024, block_px: int = 2048) -> np.ndarray:
    """Boolean tissue mask on a streamed thumbnail: coloured (stained) and not bright (glass).

    Returns:
      bool [h, w]; mask pixel (i, j) covers level-0 area scaled by dimensions / mask shape.
    """
    return is_tissue(thumbnail(slide, thumb_px, block_px))


def plan_slide(
    path: str,
    tile_px: int,
    target_mpp: float,
    *,
    min_tissue: float = 0.5,
    slide_mpp: float = 0.0,
    thumb_px: int = 1024,
    block_px: int = 2048,
    tissue_method: str = "threshold",
    min_tissue_area: float = 0.0,
    keep_thumbnail: bool = False,
) -> SlidePlan:
    """Lists tissue tiles of ``tile_px`` at ``target_mpp`` (µm/px) on a non-overlapping grid.

    Tissue is found by ``tissue_method`` ("otsu" drops pieces under ``min_tissue_area`` µm²);
    ``keep_thumbnail`` keeps the thumbnail in the plan (for the qc picture).

    Raises:
      SkipInput: the slide cannot be opened, or its thumbnail cannot be read.
      ConversionError: no plausible µm/px known, or a tile larger than the slide (the message
        starts with ``path``).
    """
    import openslide

    slide = open_slide(path)
    try:
        try:
            base = base_mpp_of(slide, slide_mpp)
        except ConversionError as e:
            raise ConversionError(f"{path}: {e}") from None
        size_l0 = int(round(tile_px * target_mpp / base))
        width, height = slide.dimensions
        if size_l0 < 1 or size_l0 > min(width, height):
            raise ConversionError(
                f"{path}: a {tile_px} px tile at {target_mpp} µm/px spans {size_l0} level-0 px "
                "but the slide is "
                f"{width}x{height}; lower --tile_px or --target_mpp"
            )
        try:
            thumb = thumbnail(slide, thumb_px, block_px)
        except openslide.OpenSlideError as e:  # a damaged tile (e.g. a corrupt JPEG) in the way
            raise SkipInput(f"its thumbnail could not be read: {str(e).splitlines()[0]}") from None
    finally:
        slide.close()
    sy, sx = thumb.shape[0] / height, thumb.shape[1] / width
    found = tissue.detect(thumb, tissue_method, min_tissue_area / (base * base) * sy * sx)
    mask = found.mask
    coords = []
    n_y, n_x = height // size_l0, width // size_l0
    for j in range(n_y):
        for i in range(n_x):
            x, y = i * size_l0, j * size_l0
            y0, y1 = int(y * sy), max(int(y * sy) + 1, int(math.ceil((y + size_l0) * sy)))
            x0, x1 = int(x * sx), max(int(x * sx) + 1, int(math.ceil((x + size_l0) * sx)))
            if mask[y0:y1, x0:x1].mean() >= min_tissue:
                coords.append((x, y))
    return SlidePlan(
        path,
        base,
        size_l0,
        tuple(coords),
        n_x * n_y,
        (width, height),
        found.method,
        found.threshold,
        found.fraction,
        thumb if keep_thumbnail else None,
    )


def read_region_rgb(slide, x: int, y: int, size_l0: int, out_px: int) -> np.ndarray:
    """Reads the level-0 square (x, y, size_l0) as uint8 RGB ``out_px`` wide.

    The region is read from the finest level whose downsample does not exceed size_l0 / out_px
    (so the pixels are never upsampled from a coarser level), then box-filtered to ``out_px``.
    Transparent pixels (outside the scanned area) become white.
    """
    want = size_l0 / out_px
    level = slide.get_best_level_for_downsample(want)
    level_ds = slide.level_downsamples[level]
    read_px = max(out_px, int(round(size_l0 / level_ds)))
    region = slide.read_region((x, y), level, (read_px, read_px))
    rgb = _flatten(region)
    if read_px != out_px:
        rgb = np.asarray(Image.fromarray(rgb).resize((out_px, out_px), Image.BOX))
    return rgb


def _flatten(region: Image.Image) -> np.ndarray:
    """RGBA region -> uint8 RGB; transparent pixels (outside the scanned area) become white."""
    rgba = np.asarray(region)
    if rgba[..., 3].min() == 255:  # the usual case: skip the float composite
        return np.ascontiguousarray(rgba[..., :3])
    alpha = rgba[..., 3:].astype(np.float32) / 255.0
    return np.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def level_for(slide, size_l0: int, out_px: int) -> int:
    """The pyramid level :func:`read_region_rgb` reads for this tile size (for notes and tests)."""
    return slide.get_best_level_for_downsample(size_l0 / out_px)
