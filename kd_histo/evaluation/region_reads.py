"""OpenSlide's C region reader for :func:`kd_histo.evaluation.slide_reader.read_tiles`: planned
tiles decoded straight into one buffer, one call per tile, or one call per row of abutting tiles
where that gives the same bytes.

``openslide_read_region`` puts a level-0 (x, y) at level pixel ``x / downsample``. Where that is
not a whole number (a level at 8.0004x, as vips and most scanners write levels whose size was
rounded), cairo samples the level bilinearly at a sub-pixel offset that drifts from tile to tile,
so a row read once and sliced holds other bytes than each tile read alone. A row is read in one
call only where every tile in it lands on whole level pixels: a whole-number downsample ``d``,
x and y multiples of ``d``, a tile side of ``read_px * d`` level-0 pixels, and tiles that abut in
one grid row (:func:`runs`); then each tile's pixels are copies of the level's, as read alone.

Not here: tiles with transparent pixels and the remainder resize (``slide_reader.read_tiles``).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Sequence

import numpy as np

# The widest run read in one call, in level pixels: OpenSlide paints wider regions in pieces of
# 4096 px itself, so a run is at most one of them.
MAX_RUN_PX = 4096


def raw_reader(slide):
    """openslide-python's ctypes binding of ``openslide_read_region`` when ``slide`` is an
    OpenSlide handle on a little-endian machine; None (read tile by tile) otherwise."""
    import openslide
    from openslide import lowlevel

    fn = getattr(lowlevel, "_read_region", None)
    ok = isinstance(slide, openslide.OpenSlide) and hasattr(slide, "_osr")
    return fn if ok and fn is not None and sys.byteorder == "little" else None


def whole_downsample(downsample: float) -> int:
    """``downsample`` as an int where it is exactly one (OpenSlide's 2.0, not 2.0003); else 0."""
    d = round(downsample)
    return d if d >= 1 and downsample == d else 0


def runs(
    coords: Sequence[tuple[int, int]],
    *,
    size_l0: int,
    read_px: int,
    downsample: float,
    max_px: int = MAX_RUN_PX,
) -> list[tuple[int, int]]:
    """Splits ``coords`` (in order) into (first index, count) runs, each read in one call.

    A run of more than one tile holds neighbours in one grid row (same y, each x ``size_l0`` past
    the one before), all on whole level pixels, at most ``max_px`` level pixels wide; every other
    tile is a run of one.
    """
    d = whole_downsample(downsample)
    exact = d > 0 and size_l0 == read_px * d
    width = max(1, max_px // read_px) if exact else 1
    out: list[tuple[int, int]] = []
    for i, (x, y) in enumerate(coords):
        on_grid = exact and x >= 0 and y >= 0 and x % d == 0 and y % d == 0
        if out and on_grid and out[-1][1] < width:
            start, k = out[-1]
            px, py = coords[start + k - 1]
            if py == y and x == px + size_l0 and start + k == i:
                out[-1] = (start, k + 1)
                continue
        out.append((i, 1))
    return out


def read_words(slide, raw, plan, coords: Sequence[tuple[int, int]]) -> tuple[np.ndarray, int]:
    """Each tile's premultiplied ARGB words ``[n, read_px, read_px]`` (uint32, tile-major; bytes
    B, G, R, A on a little-endian machine), and the number of region reads it took.

    Args:
      slide: an OpenSlide handle.
      raw: its :func:`raw_reader`.
      plan: the slide's ``slide_reader.SlideRead`` (level, read_px, size_l0, path).
      coords: level-0 (x, y) of the tiles, in order.

    Raises:
      ValueError: a read failed (a damaged tile): one line naming the slide and the tiles.
    """
    import openslide

    r = plan.read_px
    words = np.empty((len(coords), r, r), np.uint32)
    base, step = words.ctypes.data, r * r * 4
    ds = slide.level_downsamples[plan.level]
    todo = runs(coords, size_l0=plan.size_l0, read_px=r, downsample=ds)
    for start, k in todo:
        x, y = coords[start]
        dest = ctypes.c_uint32.from_address(base + start * step)  # words[start:start + k]
        try:
            raw(slide._osr, dest, x, y, plan.level, r * k, r)
        except openslide.OpenSlideError as e:
            last = f" to ({coords[start + k - 1][0]}, {y})" if k > 1 else ""
            what = "tiles" if k > 1 else "tile"
            raise ValueError(
                f"{plan.path}: cannot read the {what} at level-0 ({x}, {y}){last}: {e}"
            ) from None
        if k > 1:  # the strip's rows, [r, k * r] in words[start:start + k], to k tiles [k, r, r]
            strip = words[start : start + k].reshape(r, k, r)
            words[start : start + k] = strip.transpose(1, 0, 2).copy()
    return words, len(todo)
