"""A pyramid level's own pixels, for :mod:`kd_histo.evaluation.slide_reader` where OpenSlide would
resample them.

OpenSlide puts level-0 (x, y) at level pixel ``(x / ds, y / ds)``, ``ds`` being the level's size
ratio averaged over width and height. vips and most scanners round each level's size (17,802 px
halved three times is 2,225, not 2,225.25), so ``ds`` comes out as 8.00045, not 8: OpenSlide then
resamples every tile bilinearly at a sub-pixel offset that drifts across the slide (up to a level
pixel at its far edge), and that resampling is most of what a small student's read costs. Yet
such a level was made by shrinking level 0 by a whole ``d``: its pixel (i, j) starts at level-0
pixel (i d, j d). :class:`LevelPixels` reads those pixels themselves: a planned tile is the
``read_px`` square of level pixels from ``(round(x / d), round(y / d))`` (so it moves by at most
half a level pixel from where OpenSlide centres it, and is not blurred); pixels off the level are
white, as OpenSlide's transparent ones are once flattened.

The level's TIFF tiles are located with tifffile, read with ``os.pread`` (reader threads share
one descriptor), decoded with Pillow's libjpeg (or stored uncompressed) once into an LRU cache the
threads share. Where OpenSlide does not resample, the two agree byte for byte: every :meth:`open`
checks that on level 0's first tile, and any slide this reader cannot read exactly (another
format, compression or layout, a level that is not a whole shrink, a decoder that disagrees) is
left to OpenSlide (``open`` returns None).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import threading

import numpy as np
from PIL import Image

# TIFF compression codes read here; anything else (JPEG 2000, LZW, ...) is left to OpenSlide.
_NONE, _JPEG = 1, 7
# Decoded TIFF tiles kept, in bytes (a 256 px RGB tile is 192 KiB), shared by the reader threads.
CACHE_BYTES = 64 << 20


def whole_shrink(dims0: tuple[int, int], dims: tuple[int, int]) -> int:
    """``d`` when a level of size ``dims`` is level 0 (``dims0``) shrunk by a whole ``d``, each side
    rounded down or up; 0 when it is not."""
    (w0, h0), (w, h) = dims0, dims
    if w < 1 or h < 1:
        return 0
    d = round(w0 / w)
    fits = d >= 1 and w in (w0 // d, -(-w0 // d)) and h in (h0 // d, -(-h0 // d))
    return d if fits else 0


@dataclasses.dataclass(frozen=True)
class _Page:
    """Where one tiled TIFF page's tiles are, and how they decode."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    compression: int
    jpeg_tables: bytes
    raw_rgb: bool  # JPEG tiles whose components are R, G, B (photometric RGB): not YCbCr

    @property
    def across(self) -> int:
        return -(-self.width // self.tile_w)

    def decode(self, data: bytes) -> np.ndarray:
        """One stored tile as uint8 ``[tile_h, tile_w, 3]``."""
        shape = (self.tile_h, self.tile_w, 3)
        if self.compression == _NONE:
            return np.frombuffer(data, np.uint8, count=int(np.prod(shape))).reshape(shape)
        if self.jpeg_tables:  # abbreviated JPEG: the tables are the page's, once
            data = self.jpeg_tables[:-2] + data[2:]
        im = Image.open(io.BytesIO(data))
        if self.raw_rgb:  # libjpeg would take 3 components for YCbCr and convert them
            im.draft("YCbCr", im.size)
        tile = np.asarray(im)
        if tile.shape != shape:
            raise ValueError(f"a tile decoded to {tile.shape}, not {shape}")
        return tile


def _page_of(page) -> _Page | None:
    """A tifffile page as :class:`_Page`, or None where it is not 8-bit RGB tiles read here."""
    photometric = int(page.photometric)  # 2: RGB, 6: YCbCr
    ok = (
        page.is_tiled
        and int(page.compression) in (_NONE, _JPEG)
        and page.samplesperpixel == 3
        and page.bitspersample == 8
        and int(page.planarconfig) == 1  # contiguous
        and photometric in (2, 6)
        and page.imagedepth == 1
        and (int(page.compression) == _JPEG or photometric == 2)
    )
    if not ok:
        return None
    return _Page(
        width=page.imagewidth,
        height=page.imagelength,
        tile_w=page.tilewidth,
        tile_h=page.tilelength,
        offsets=tuple(page.dataoffsets),
        counts=tuple(page.databytecounts),
        compression=int(page.compression),
        jpeg_tables=bytes(page.jpegtables or b""),
        raw_rgb=int(page.compression) == _JPEG and photometric == 2,
    )


class LevelPixels:
    """Planned tiles of one slide level, read as the level's own pixels (module docstring)."""

    def __init__(self, path: str, page: _Page, shrink: int):
        self.path, self.page, self.shrink = path, page, shrink
        self._fd = os.open(path, os.O_RDONLY)
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._bytes = 0

    @classmethod
    def open(cls, slide, path: str, level: int) -> LevelPixels | None:
        """A reader of ``level`` of the slide open in ``slide`` (OpenSlide), or None where
        OpenSlide reads that level exactly itself or this reader cannot read it exactly."""
        dims = slide.level_dimensions
        d = whole_shrink(dims[0], dims[level])
        if not d or slide.level_downsamples[level] == d:
            return None
        try:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                tiled = [p for p in tif.pages if getattr(p, "is_tiled", False)]
                at = {(p.imagewidth, p.imagelength): p for p in reversed(tiled)}
                level_page, page0 = at.get(tuple(dims[level])), at.get(tuple(dims[0]))
                pages = [_page_of(p) if p is not None else None for p in (level_page, page0)]
        except Exception:  # not a TIFF tifffile reads: OpenSlide's business
            return None
        if None in pages or (pages[0].compression, pages[0].raw_rgb) != (
            pages[1].compression,
            pages[1].raw_rgb,
        ):
            return None
        check = cls(path, pages[1], 1)
        try:
            agrees = check._agrees_with(slide)
        finally:
            check.close()
        return cls(path, pages[0], d) if agrees else None

    def _agrees_with(self, slide) -> bool:
        """Level 0's first stored tile, decoded here, is OpenSlide's level-0 read byte for byte."""
        p = self.page
        w, h = min(p.tile_w, p.width), min(p.tile_h, p.height)
        try:
            mine = self._tile(0)[:h, :w]
        except (OSError, ValueError):
            return False
        region = np.asarray(slide.read_region((0, 0), 0, (w, h)))
        return bool(region[..., 3].min() == 255 and np.array_equal(mine, region[..., :3]))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _tile(self, k: int) -> np.ndarray:
        """Stored tile ``k``, decoded (from the cache when it is there)."""
        with self._lock:
            hit = self._cache.get(k)
            if hit is not None:
                self._cache.move_to_end(k)
                return hit
        p = self.page
        if p.counts[k] == 0:  # a sparse TIFF's empty tile: glass
            tile = np.full((p.tile_h, p.tile_w, 3), 255, np.uint8)
        else:
            tile = p.decode(os.pread(self._fd, p.counts[k], p.offsets[k]))
        with self._lock:
            if k not in self._cache:
                self._cache[k] = tile
                self._bytes += tile.nbytes
            while self._bytes > CACHE_BYTES and len(self._cache) > 1:
                self._bytes -= self._cache.popitem(last=False)[1].nbytes
        return tile

    def read_into(self, out: np.ndarray, x: int, y: int) -> None:
        """The ``out.shape[0]``-px square of level pixels nearest level-0 (x, y), into ``out``
        (uint8 ``[r, r, 3]``).

        Raises:
          ValueError: a stored tile that does not decode: one line naming the slide and the tile.
        """
        p, d, r = self.page, self.shrink, out.shape[0]
        lx, ly = (2 * x + d) // (2 * d), (2 * y + d) // (2 * d)  # round half up
        x0, x1, y0, y1 = max(lx, 0), min(lx + r, p.width), max(ly, 0), min(ly + r, p.height)
        if (x0, y0, x1, y1) != (lx, ly, lx + r, ly + r):
            out[:] = 255  # off the level: glass
        for ty in range(y0 // p.tile_h, (y1 - 1) // p.tile_h + 1 if y1 > y0 else 0):
            for tx in range(x0 // p.tile_w, (x1 - 1) // p.tile_w + 1 if x1 > x0 else 0):
                try:
                    tile = self._tile(ty * p.across + tx)
                except (OSError, ValueError) as e:
                    raise ValueError(
                        f"{self.path}: cannot read the tile at level-0 ({x}, {y}): {e}"
                    ) from None
                ax0, ax1 = max(x0, tx * p.tile_w), min(x1, (tx + 1) * p.tile_w)
                ay0, ay1 = max(y0, ty * p.tile_h), min(y1, (ty + 1) * p.tile_h)
                out[ay0 - ly : ay1 - ly, ax0 - lx : ax1 - lx] = tile[
                    ay0 - ty * p.tile_h : ay1 - ty * p.tile_h,
                    ax0 - tx * p.tile_w : ax1 - tx * p.tile_w,
                ]

    def read_tiles(self, coords, read_px: int) -> np.ndarray:
        """:meth:`read_into` of each level-0 (x, y) in ``coords``: uint8 ``[n, r, r, 3]``."""
        out = np.empty((len(coords), read_px, read_px, 3), np.uint8)
        for i, (x, y) in enumerate(coords):
            self.read_into(out[i], x, y)
        return out


def open_level(path: str, level: int) -> LevelPixels | None:
    """:meth:`LevelPixels.open` on a slide file (None where OpenSlide reads the level itself)."""
    from kd_histo.convert import slides
    from kd_histo.convert.errors import SkipInput

    try:
        slide = slides.open_slide(path)
    except SkipInput as e:
        raise ValueError(f"{path}: {e}") from None
    try:
        return LevelPixels.open(slide, path, level)
    finally:
        slide.close()
