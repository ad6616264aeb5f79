"""One whole-slide image through a model at the model's own resolution (kd-histo-predict's slides).

The slide's tissue tiles are planned at the model's pyramid level (``slide_reader.plan_read``)
and streamed by reader threads that decode each batch straight into one uint8 array
(``slide_reader.read_tiles``), while the model, one compiled graph traced once for any batch
size (``tile_classifier.slide_classifier``), runs on the previous batch. A student's batch holds
up to the pixels of ``batch_size`` HR tiles (:func:`tiles_per_batch`): a student x8 takes 8x
more of its 8x smaller tiles per call (256 for 32), so a small net's per-call overhead is paid
less often. Every
tile's result is independent of its batch (GroupNorm normalises each tile on its own; tested), so
the batch changes the speed, not the output.

Not here: the output files and the cascade's selection (``kd_histo.evaluation.predict``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np

from kd_histo.evaluation.predict_inputs import Tiles
from kd_histo.evaluation.qupath_out import SlideGrid
from kd_histo.evaluation.tile_classifier import memory_lr_method
from kd_histo.training.run_record import RunRecord

_LOG = logging.getLogger(__name__)


# Tiles per model call beyond which a larger batch of small tiles gained nothing measurable
# (x8 student, 28 px: the same tiles/CPU-s at 256-2048) and the stream's first and last batches,
# read or run alone, grow (BUILD_NOTES.md, issue 29).
MAX_SMALL_BATCH = 256


def tiles_per_batch(batch_size: int, hr_px: int, input_px: int) -> int:
    """Tiles of ``input_px`` per model call: as many as hold the pixels of ``batch_size`` HR tiles
    of ``hr_px`` (so memory per batch stays the teacher's), at most ``MAX_SMALL_BATCH``, and never
    fewer than ``batch_size``."""
    same_pixels = batch_size * max(1, round((hr_px / input_px) ** 2))
    return max(batch_size, min(same_pixels, MAX_SMALL_BATCH))


def warm_up(classify, run: RunRecord, batch_size: int) -> None:
    """The model's first call, on a blank batch of a slide's size, before any slide's clock starts:
    it traces the graph and sets up oneDNN's kernels for that shape (0.13 s measured for a student
    x8 whose whole 6,241-tile slide streams in 0.4 s), a cost of the process, not of a slide."""
    n = tiles_per_batch(batch_size, run.hr_px, run.input_px)
    probs, _ = classify(np.zeros((n, run.input_px, run.input_px, 3), np.uint8))
    np.asarray(probs)


def predict_slide(
    classify,
    path: str,
    run: RunRecord,
    *,
    mpp: float,
    batch_size: int,
    num_workers: int,
    min_tissue: float,
    max_tiles: int,
    slide_mpp: float,
) -> tuple[Tiles, np.ndarray, np.ndarray]:
    """A slide's tissue tiles read at the model's own µm/px (``slide_reader``), classified:
    (tiles, probabilities, out-of-domain features). ``batch_size`` counts HR tiles
    (:func:`tiles_per_batch`); the cascade's re-reads of HR tiles come in batches of it."""
    from kd_histo.evaluation import slide_reader

    plan = slide_reader.plan_read(
        path,
        hr_px=run.hr_px,
        hr_mpp=mpp,
        input_px=run.input_px,
        method=memory_lr_method(run),
        min_tissue=min_tissue,
        max_tiles=max_tiles,
        slide_mpp=slide_mpp,
    )
    if plan.note:
        _LOG.info(plan.note)
    sid = os.path.splitext(os.path.basename(path))[0]
    trace = getattr(classify, "get_concrete_function", None)
    if trace is not None:  # the graph is traced once per process, before the first slide's clock
        trace()
    progress = slide_reader.Progress(sid, len(plan.coords))
    out, emb = [], []
    batch = tiles_per_batch(batch_size, run.hr_px, plan.input_px)
    # the readers fill the next batches while the model runs on this one
    for tiles in slide_reader.stream_batches(plan, batch, num_workers=num_workers):
        probs, pooled = classify(tiles)
        out.append(np.asarray(probs))
        emb.append(np.asarray(pooled))
        progress.update(len(tiles))
    progress.close(
        f" (level {plan.level} at {plan.level_mpp:.3g} µm/px, {plan.read_px} px reads, "
        f"{plan.input_px} px model input, {batch} tiles a batch)"
    )

    def reread(idx) -> Iterator[np.ndarray]:  # HR tiles for the cascade's teacher, at its own level
        hr = slide_reader.for_input(plan, run.hr_px, coords=[plan.coords[i] for i in idx])
        for b in slide_reader.stream_batches(hr, batch_size, num_workers=num_workers):
            yield from b

    from kd_histo.convert import slides

    slide = slides.open_slide(path)  # readable a moment ago (plan_read opened it)
    try:
        width, height = slide.dimensions
    finally:
        slide.close()
    grid = SlideGrid(path, plan.size_l0, plan.base_mpp, width, height)
    tiles = Tiles(sid, [path] * len(plan.coords), list(plan.coords), None, grid=grid, reread=reread)
    return tiles, np.concatenate(out), np.concatenate(emb)
