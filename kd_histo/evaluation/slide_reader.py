"""Whole-slide tiles at a model's own resolution, read in parallel and streamed in batches.

:func:`plan_read` lays the tissue grid of :func:`kd_histo.convert.slides.plan_slide` (tissue found
on a thumbnail read from a low level, never on high-resolution tiles) at the area of the training
HR tile (``hr_px`` at ``hr_mpp``), then picks where a model reading ``input_px`` at ``mpp_in``
reads its pixels: the coarsest pyramid level whose µm/px is not coarser than ``mpp_in`` (so a
student x8 never decodes level 0 when the slide has a lower level), resizing only the remainder,
antialiased, with the run's LR method. A slide without such a level (a single-level file) is read
at level 0 and shrunk; the plan's ``note`` says so in one line.

:func:`stream_batches` reads the planned tiles with ``num_workers`` threads, each holding its own
OpenSlide handle (OpenSlide's C reads and Pillow's resize release the GIL, so threads decode in
parallel; unlike worker processes they cannot outlive their process, whatever kills it). At most
``window`` batches are in flight, in order, while the caller runs the model on the previous one:
pixel memory is bounded by ``window x batch_size`` tiles whatever the slide's size. A level stored
at a rounded size, which OpenSlide would resample, is read as its own pixels
(:mod:`kd_histo.evaluation.level_pixels`).

Not here: the model and the output files (:mod:`kd_histo.evaluation.predict`), converting slides to
shards
(:mod:`kd_histo.convert.slides`).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TextIO

import numpy as np
from PIL import Image

from kd_histo.convert import slides
from kd_histo.convert.errors import ConversionError, SkipInput
from kd_histo.evaluation import level_pixels, region_reads
from kd_histo.progress import around_bars, progress

_LOG = logging.getLogger(__name__)
# A level counts as "at" a resolution within this relative tolerance: scanners store downsamples
# such as 4.0003, and resizing by 1.0003 is not worth a resample.
LEVEL_TOLERANCE = 0.02
# The remainder resize per LR method of training (Pillow's filters widen with the shrink factor,
# i.e. they are antialiased as tf.image.resize(..., antialias=True) is in training).
_FILTERS = {
    "area": Image.BOX,
    "pyramid": Image.BOX,
    "bicubic": Image.BICUBIC,
    "bilinear": Image.BILINEAR,
}


@dataclasses.dataclass(frozen=True)
class SlideRead:
    """Where and how one slide's tiles are read for one model.

    Attributes:
      path: the slide file.
      base_mpp: level-0 µm/px.
      size_l0: tile side in level-0 pixels (the area of one HR training tile).
      coords: level-0 (x, y) corner of each tissue tile, row-major.
      grid_tiles: tiles in the grid before background was dropped.
      input_px: side of the tiles handed to the model.
      mpp_in: µm/px of those tiles.
      level: pyramid level read.
      level_mpp: µm/px of that level.
      read_px: pixels read per tile side at that level (== input_px: no resize).
      method: resize of the remainder ("area", "bicubic", "bilinear"; "pyramid" reads as area).
      note: one line when the slide lacks a level near ``mpp_in`` and is shrunk from a finer one.
    """

    path: str
    base_mpp: float
    size_l0: int
    coords: tuple[tuple[int, int], ...]
    grid_tiles: int
    input_px: int
    mpp_in: float
    level: int
    level_mpp: float
    read_px: int
    method: str = "area"
    note: str = ""

    @property
    def shrink(self) -> float:
        """Resize factor of the remainder (1 = the level's pixels as read)."""
        return self.read_px / self.input_px


def choose_level(
    base_mpp: float, downsamples: Sequence[float], mpp_in: float, tolerance: float = LEVEL_TOLERANCE
) -> int:
    """The coarsest level whose µm/px is at most ``mpp_in`` (within ``tolerance``); 0 if none is.

    Args:
      base_mpp: level-0 µm/px.
      downsamples: each level's downsample relative to level 0 (OpenSlide's ``level_downsamples``).
      mpp_in: µm/px the model reads.
      tolerance: relative slack, so a level at 2.0006 µm/px serves a 2.0 µm/px model.
    """
    best = 0
    for k, ds in enumerate(downsamples):
        if base_mpp * ds <= mpp_in * (1 + tolerance) and ds > downsamples[best]:
            best = k
    return best


def plan_read(
    path: str,
    *,
    hr_px: int,
    hr_mpp: float,
    input_px: int,
    method: str = "area",
    min_tissue: float = 0.5,
    max_tiles: int = 0,
    slide_mpp: float = 0.0,
) -> SlideRead:
    """Plans reading a slide's tissue tiles for a model reading ``input_px`` px per HR tile.

    Args:
      path: slide file (anything OpenSlide opens, pyramidal TIFF included).
      hr_px: side of the training HR tiles.
      hr_mpp: their µm/px; a tile covers ``hr_px * hr_mpp`` µm, whatever the model's resolution.
      input_px: side of the model's input (``hr_px`` for a teacher, ``hr_px / factor`` for a
        student); it is read at ``mpp_in = hr_px * hr_mpp / input_px``.
      method: the run's LR method; the remainder resize uses the same filter. (HR tiles shrunk in
        memory, training's way: plan with ``input_px=hr_px`` and resize the batches.)
      min_tissue: fraction of a tile that must be tissue.
      max_tiles: at most this many tiles, evenly spaced (0 = all).
      slide_mpp: level-0 µm/px for slides whose metadata lacks it (0 = from the metadata).

    Raises:
      ValueError: unreadable slide, no µm/px, a tile larger than the slide, or no tissue tile.
    """
    if method not in _FILTERS:  # before the tissue mask is computed
        raise ValueError(f"lr_method {method!r} unknown; choose one of {sorted(_FILTERS)}")
    import openslide

    try:
        grid = slides.plan_slide(path, hr_px, hr_mpp, min_tissue=min_tissue, slide_mpp=slide_mpp)
    except (
        SkipInput,
        ConversionError,
        openslide.OpenSlideError,
    ) as e:  # binaries need a ValueError; plan_slide's own errors name the slide already
        raise ValueError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
    coords = list(grid.coords)
    if not coords:
        raise ValueError(f"{path}: no tile has {min_tissue:.0%} tissue; lower --min_tissue")
    if max_tiles and len(coords) > max_tiles:
        coords = [coords[i] for i in np.linspace(0, len(coords) - 1, max_tiles).round().astype(int)]
    mpp_in = hr_px * hr_mpp / input_px
    if mpp_in < grid.base_mpp * (1 - LEVEL_TOLERANCE):
        _LOG.warning(
            f"{path}: the model reads {mpp_in:.3g} µm/px, finer than the slide's scan "
            f"({grid.base_mpp:.3g} µm/px at level 0): its tiles are upsampled, with no more "
            "detail than the scan; check --read_mpp (and --slide_mpp)"
        )
    return _at_input(
        path,
        grid.base_mpp,
        grid.size_l0,
        tuple(coords),
        grid.grid_tiles,
        input_px,
        mpp_in,
        method,
    )


def for_input(
    plan: SlideRead,
    input_px: int,
    *,
    method: str = "area",
    coords: Sequence[tuple[int, int]] | None = None,
) -> SlideRead:
    """The same grid's tiles (or ``coords`` of them) read for another model's ``input_px``.

    For the cascade: the teacher re-reads the student's least confident tiles at its own level.
    """
    mpp_in = plan.mpp_in * plan.input_px / input_px  # the tile's µm over the new side
    return _at_input(
        plan.path,
        plan.base_mpp,
        plan.size_l0,
        tuple(plan.coords if coords is None else coords),
        plan.grid_tiles,
        input_px,
        mpp_in,
        method,
    )


def _at_input(path, base_mpp, size_l0, coords, grid_tiles, input_px, mpp_in, method) -> SlideRead:
    if method not in _FILTERS:
        raise ValueError(f"lr_method {method!r} unknown; choose one of {sorted(_FILTERS)}")
    try:
        slide = slides.open_slide(path)
    except SkipInput as e:
        raise ValueError(f"{path}: {e}") from None
    try:
        downsamples = tuple(slide.level_downsamples)
    finally:
        slide.close()
    level = choose_level(base_mpp, downsamples, mpp_in)
    read_px = max(1, int(round(size_l0 / downsamples[level])))
    note = ""
    if read_px > input_px * (1 + LEVEL_TOLERANCE):
        levels = ", ".join(f"{base_mpp * d:.3g}" for d in downsamples)
        note = (
            f"{path}: no pyramid level near {mpp_in:.3g} µm/px (levels at {levels} µm/px); "
            f"reading level {level} and shrinking {read_px / input_px:.3g}x"
        )
    return SlideRead(
        path=path,
        base_mpp=base_mpp,
        size_l0=size_l0,
        coords=coords,
        grid_tiles=grid_tiles,
        input_px=input_px,
        mpp_in=mpp_in,
        level=level,
        level_mpp=base_mpp * downsamples[level],
        read_px=read_px,
        method=method,
        note=note,
    )


def read_tile(slide, plan: SlideRead, x: int, y: int) -> np.ndarray:
    """One planned tile, uint8 RGB ``[input_px, input_px, 3]``; glass outside the scan is white."""
    region = slide.read_region((x, y), plan.level, (plan.read_px, plan.read_px))
    return _remainder(plan, slides._flatten(region))


def _remainder(plan: SlideRead, rgb: np.ndarray) -> np.ndarray:
    """A tile as read (``read_px``) at the model's ``input_px``: the remainder resize, if any.
    From uint8: one rounding, where training rounds never (its float views); below 1/255."""
    if plan.read_px == plan.input_px:
        return rgb
    return np.asarray(
        Image.fromarray(rgb).resize((plan.input_px, plan.input_px), _FILTERS[plan.method])
    )


def read_tiles(slide, plan: SlideRead, coords: Sequence[tuple[int, int]]) -> np.ndarray:
    """The planned tiles at ``coords``, uint8 ``[n, input_px, input_px, 3]``: the same bytes as
    :func:`read_tile` of each, in one array. An OpenSlide handle's tiles are read straight into one
    buffer by OpenSlide's C reader, a row of abutting tiles in one call where that gives the same
    bytes (:mod:`kd_histo.evaluation.region_reads`); a tile with transparent pixels (glass outside
    the scan) goes through :func:`read_tile`."""
    return _read_tiles(slide, plan, coords)[0]


def _read_tiles(
    slide, plan: SlideRead, coords: Sequence[tuple[int, int]], pixels=None
) -> tuple[np.ndarray, int]:
    """:func:`read_tiles` and the number of OpenSlide region reads it took; with ``pixels`` (a
    :class:`kd_histo.evaluation.level_pixels.LevelPixels`), the level's own pixels instead."""
    out = np.empty((len(coords), plan.input_px, plan.input_px, 3), np.uint8)
    if pixels is not None:
        rgb = pixels.read_tiles(coords, plan.read_px)
        if plan.read_px == plan.input_px:
            return rgb, 0
        for i in range(len(coords)):
            out[i] = _remainder(plan, rgb[i])
        return out, 0
    raw = region_reads.raw_reader(slide)
    if raw is None:
        for i, (x, y) in enumerate(coords):
            out[i] = _tile(slide, plan, x, y)
        return out, len(coords)
    words, calls = region_reads.read_words(slide, raw, plan, coords)
    # every alpha byte 255 <=> every word >= 0xFF000000 (alpha is the word's top byte)
    opaque = (
        words.reshape(len(coords), plan.read_px**2).min(axis=1, initial=0xFFFFFFFF) >= 0xFF000000
    )
    argb = words.view(np.uint8).reshape(*words.shape, 4)  # B, G, R, A bytes (little-endian)
    if plan.read_px == plan.input_px:
        out[:] = argb[..., 2::-1]
    for i, (x, y) in enumerate(coords):
        if not opaque[i]:
            out[i] = _tile(slide, plan, x, y)
            calls += 1
        elif plan.read_px != plan.input_px:  # the remainder resize of read_tile, same pixels
            out[i] = _remainder(plan, np.ascontiguousarray(argb[i, ..., 2::-1]))
    return out, calls


def _tile(slide, plan: SlideRead, x: int, y: int) -> np.ndarray:
    """:func:`read_tile`, a damaged tile one line naming it."""
    import openslide

    try:
        return read_tile(slide, plan, x, y)
    except openslide.OpenSlideError as e:
        raise ValueError(f"{plan.path}: cannot read the tile at level-0 ({x}, {y}): {e}") from None


@dataclasses.dataclass
class StreamStats:
    """What a stream did: batches and tiles read, the most batches it ever held at once, reader
    handles opened, OpenSlide region reads (fewer than tiles where rows are read whole), and
    whether the level's own pixels were read instead (:mod:`kd_histo.evaluation.level_pixels`)."""

    batches: int = 0
    tiles: int = 0
    max_in_flight: int = 0
    handles_opened: int = 0
    region_reads: int = 0
    level_pixels: bool = False


def stream_batches(
    plan: SlideRead,
    batch_size: int,
    *,
    num_workers: int = 2,
    window: int = 0,
    stats: StreamStats | None = None,
) -> Iterator[np.ndarray]:
    """Yields the planned tiles in order as uint8 batches ``[<=batch_size, input_px, input_px, 3]``.

    Args:
      plan: from :func:`plan_read`.
      batch_size: tiles per batch.
      num_workers: reader threads, each with its own OpenSlide handle; 0 reads in the caller.
      window: batches read ahead at most (0 = 2 per worker); memory is bounded by it.
      stats: filled in as the stream runs (tests, benchmarks).
    """

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stats = stats if stats is not None else StreamStats()
    chunks = (plan.coords[i : i + batch_size] for i in range(0, len(plan.coords), batch_size))
    handles, lock, local = [], threading.Lock(), threading.local()
    cache = _shared_cache()
    pixels = level_pixels.open_level(plan.path, plan.level)  # where OpenSlide would resample
    stats.level_pixels = pixels is not None

    def read_batch(chunk) -> np.ndarray:
        if pixels is not None:  # no OpenSlide handle needed
            return _read_tiles(None, plan, chunk, pixels)[0]
        slide = getattr(local, "slide", None)
        if slide is None:
            try:
                slide = local.slide = slides.open_slide(plan.path)
            except SkipInput as e:
                raise ValueError(f"{plan.path}: {e}") from None
            if cache is not None:
                slide.set_cache(cache)
            with lock:
                handles.append(slide)
                stats.handles_opened += 1
        tiles, calls = _read_tiles(slide, plan, chunk)
        with lock:
            stats.region_reads += calls
        return tiles

    def done(batch: np.ndarray) -> np.ndarray:
        stats.batches += 1
        stats.tiles += len(batch)
        return batch

    try:
        if num_workers <= 0:
            for chunk in chunks:
                stats.max_in_flight = max(stats.max_in_flight, 1)
                yield done(read_batch(chunk))
            return
        window = window or 2 * num_workers
        with ThreadPoolExecutor(num_workers, thread_name_prefix="kd_histo-slide-reader") as pool:
            pending = collections.deque(
                pool.submit(read_batch, c) for c in itertools.islice(chunks, window)
            )
            try:
                while pending:
                    stats.max_in_flight = max(stats.max_in_flight, len(pending))
                    batch = pending.popleft().result()
                    nxt = next(chunks, None)
                    if nxt is not None:
                        pending.append(pool.submit(read_batch, nxt))
                    yield done(batch)
            finally:  # the consumer stopped early or failed: drop what was not started
                for f in pending:
                    f.cancel()
    finally:
        for h in handles:
            h.close()
        if pixels is not None:
            pixels.close()


def _shared_cache(capacity: int = 64 << 20):
    """One decoded-tile cache for all reader handles (neighbouring tiles share JPEG tiles)."""
    import openslide

    try:
        return openslide.OpenSlideCache(capacity)
    except (AttributeError, openslide.OpenSlideError):  # OpenSlide < 4.0 has no shared caches
        return None


class Progress:
    """Tiles done and tiles/s of one slide: its progress while it is read
    (:func:`kd_histo.progress.progress` on ``bar_stream``, stderr: a bar on a terminal, else a
    line every ``EVERY_S`` seconds), then one summary line (on ``stream``, stdout)."""

    def __init__(
        self,
        label: str,
        total: int,
        *,
        stream: TextIO | None = None,
        bar_stream: TextIO | None = None,
    ) -> None:
        self.label, self.total, self.done = label, total, 0
        self.stream = stream or sys.stdout
        self.bar = progress(total=total, desc=label, unit="tiles", stream=bar_stream, leave=False)
        self.start = time.perf_counter()

    @property
    def rate(self) -> float:
        """Tiles per second so far."""
        return self.done / max(1e-9, time.perf_counter() - self.start)

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)

    def close(self, extra: str = "") -> str:
        """Ends the progress and prints (and returns) the summary line."""
        self.bar.close()
        line = (
            f"{self.label}: {self.done} tiles in {time.perf_counter() - self.start:.1f} s, "
            f"{self.rate:.0f} tiles/s{extra}"
        )
        with around_bars():  # the cohort's bar, if any, steps aside
            print(line, file=self.stream, flush=True)
        return line
