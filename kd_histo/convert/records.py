"""Turns one work unit (a chunk of tiles, or a chunk of one slide's grid) into a part file.

A unit is processed by a worker process (or in-process when ``num_workers=0``): each input is read,
fitted to ``tile_px``, encoded (PNG, lossless, by default; JPEG with a quality), wrapped with
``kd_histo.schema.make_example`` and appended to ``<parts>/<unit_id>.tfrecord``; a summary JSON
(counts per class, skips, notes, pixel sums) is written last, atomically, and marks the unit done.

This module does not plan units, choose splits or write the final shards (see ``convert.convert``).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os

import numpy as np
from PIL import Image

from kd_histo import schema
from kd_histo.atomic import write_json
from kd_histo.convert import h5, slides, tiles, writer
from kd_histo.convert.errors import ConversionError, SkipInput
from kd_histo.convert.stats import PixelStats
from kd_histo.settings import setting


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    """How tiles are read and stored (identical for every unit of a conversion)."""

    tile_px: int = setting(224, "Side of the stored tiles in pixels.")
    fit: str = setting(
        "crop", "Tile images of another size: centre-crop or resize.", choices=("crop", "resize")
    )
    image_format: str = setting(
        "png", "PNG is lossless; JPEG with --jpeg_quality.", choices=("png", "jpeg")
    )
    jpeg_quality: int = setting(95, "JPEG quality (1-100).")
    png_level: int = setting(6, "PNG zlib level (0-9); lossless at every level.")
    max_pixels: int = setting(
        tiles.DEFAULT_MAX_PIXELS, "Larger tile images are refused (decompression bombs)."
    )
    tiff_decoder: str = setting(
        "pil", "Decode .tif tiles with Pillow or tensorflow-io.", choices=("pil", "tfio")
    )
    strict: bool = setting(False, "Fail on the first unreadable input instead of skipping it.")
    tile_mpp: float = setting(0.0, "µm/px of tile images when known (recorded; 0 = unknown).")
    h5_key: str = setting("x", "Dataset name of the patches in --h5_images.")
    # kd-histo-convert's --target_mag sets it too (10x = 1.0 µm/px).
    target_mpp: float = setting(0.5, "µm/px of slide tiles.")
    lr_factor: int = setting(0, "Also store the aligned LR slide tile, tile_px/lr_factor wide.")
    min_tissue: float = setting(0.5, "Fraction of tissue a slide tile needs to be kept.")
    tissue_method: str = setting(
        "otsu",
        "Slide tissue: Otsu's threshold on the thumbnail's colour, closed and opened, specks "
        "under --min_tissue_area dropped (otsu); or the fixed colour rule, also re-checked on "
        "each tile as read (threshold).",
        choices=("otsu", "threshold"),
    )
    min_tissue_area: float = setting(
        10_000.0, "With --tissue_method=otsu: drop tissue pieces smaller than this, in µm²."
    )


@dataclasses.dataclass(frozen=True)
class Item:
    """One input of a unit: a tile file, or one tile of a slide (``size_l0`` > 0)."""

    path: str
    label: int
    slide_id: str
    patient_id: str = ""
    x: int = 0
    y: int = 0
    size_l0: int = 0


@dataclasses.dataclass(frozen=True)
class Unit:
    """A chunk of items of one split, written to one part file."""

    unit_id: str
    split: str
    items: tuple[Item, ...]


def encode(rgb: np.ndarray, opts: EncodeOptions) -> bytes:
    """Encodes uint8 RGB as PNG (lossless) or JPEG."""
    buf = io.BytesIO()
    img = Image.fromarray(rgb)
    if opts.image_format == "png":
        img.save(buf, format="PNG", compress_level=opts.png_level)
    else:
        img.save(buf, format="JPEG", quality=opts.jpeg_quality, subsampling=0)
    return buf.getvalue()


def summary_path(parts_dir: str, unit_id: str) -> str:
    return os.path.join(parts_dir, f"{unit_id}.json")


def process_unit(
    unit: Unit, opts: EncodeOptions, parts_dir: str, class_names: tuple[str, ...]
) -> dict:
    """Writes one unit's part file and summary (skipped when the summary already exists).

    Returns:
      The summary: unit_id, split, count, counts (class name or "unlabeled" -> n), skipped,
      notes (note -> number of inputs), background (slide tiles dropped as background), stats.

    Raises:
      ConversionError: a fatal input problem, or any skip when ``opts.strict``.
    """
    done = summary_path(parts_dir, unit.unit_id)
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    counts: collections.Counter = collections.Counter()
    notes: collections.Counter = collections.Counter()
    skipped: list[dict[str, str]] = []
    stats = PixelStats()
    background = 0
    open_slides: dict[str, object] = {}
    h5_reader = h5.H5Reader(opts.h5_key)

    def records():
        nonlocal background
        for item in unit.items:
            try:
                read = _read_item(item, opts, open_slides, h5_reader)
            except SkipInput as e:
                if opts.strict:
                    raise ConversionError(
                        f"{item.path}: {e} (--strict stops at the first bad input; "
                        "drop --strict to skip it)"
                    ) from None
                skipped.append({"path": item.path, "reason": str(e)})
                continue
            if read is None:
                background += 1
                continue
            rgb, lr, mpp, file_notes = read
            notes.update(file_notes)
            stats.add(rgb)
            counts[class_names[item.label] if item.label >= 0 else "unlabeled"] += 1
            yield _serialized_example(item, rgb, lr, mpp, opts)

    try:
        n = writer.write_records_atomic(
            os.path.join(parts_dir, f"{unit.unit_id}.tfrecord"), records()
        )
    finally:
        for s in open_slides.values():
            s.close()
    summary = {
        "unit_id": unit.unit_id,
        "split": unit.split,
        "count": n,
        "counts": dict(counts),
        "skipped": skipped,
        "notes": dict(notes),
        "background": background,
        "stats": dataclasses.asdict(stats),
    }
    write_json(done, summary)
    return summary


def _read_item(
    item: Item, opts: EncodeOptions, open_slides: dict, h5_reader: h5.H5Reader
) -> tuple[np.ndarray, np.ndarray | None, float, list[str]] | None:
    """One input's tile fitted to ``tile_px``, its LR tile (slides with ``lr_factor``) or None,
    its µm/px and the notes on the file; None for a slide tile dropped as background.

    Raises:
      ConversionError: a fatal input problem, naming the file.
      SkipInput: an unreadable input (the caller skips it, or stops under ``--strict``).
    """
    try:
        if item.size_l0:
            rgb, lr, mpp = _read_slide_tile(item, opts, open_slides)
            # Otsu's mask (with its morphology) is the decision; the fixed rule is
            # re-checked on the tile's own pixels, finer than its thumbnail.
            if opts.tissue_method == "threshold" and is_background(rgb, opts.min_tissue):
                return None
            return rgb, lr, mpp, []
        if h5.is_h5_item(item.path):
            rgb = tiles.fit_tile(h5_reader.read(item.path), opts.tile_px, opts.fit)
            return rgb, None, opts.tile_mpp, []
        rgb, file_notes = tiles.read_tile(
            item.path, max_pixels=opts.max_pixels, decoder=opts.tiff_decoder
        )
        if opts.fit == "resize" and min(rgb.shape[:2]) < opts.tile_px:
            file_notes.append("smaller than tile_px: upsampled (--fit=resize)")
        rgb = tiles.fit_tile(rgb, opts.tile_px, opts.fit)
        return rgb, None, opts.tile_mpp, file_notes
    except ConversionError as e:  # an image too small for the tile: name the file
        raise ConversionError(f"{item.path}: {e}") from None


def _serialized_example(
    item: Item, rgb: np.ndarray, lr: np.ndarray | None, mpp: float, opts: EncodeOptions
) -> bytes:
    """The stored record of one tile (with its LR tile when there is one)."""
    ex = schema.make_example(
        encode(rgb, opts),
        rgb.shape[0],
        rgb.shape[1],
        label=item.label,
        slide_id=item.slide_id,
        patient_id=item.patient_id,
        x=item.x,
        y=item.y,
        mpp=mpp,
        source=item.path,
        lr_image=encode(lr, opts) if lr is not None else b"",
        lr_factor=float(opts.lr_factor) if lr is not None else 0.0,
    )
    return ex.SerializeToString()


def is_background(rgb: np.ndarray, min_tissue: float) -> bool:
    """True when less than ``min_tissue`` of the tile's pixels look like tissue."""
    return float(slides.is_tissue(rgb).mean()) < min_tissue


def _read_slide_tile(
    item: Item, opts: EncodeOptions, cache: dict
) -> tuple[np.ndarray, np.ndarray | None, float]:
    slide = cache.get(item.path)
    if slide is None:
        slide = cache[item.path] = slides.open_slide(item.path)
    try:
        rgb = slides.read_region_rgb(slide, item.x, item.y, item.size_l0, opts.tile_px)
        lr = None
        if opts.lr_factor:
            lr = slides.read_region_rgb(
                slide, item.x, item.y, item.size_l0, opts.tile_px // opts.lr_factor
            )
    except Exception as e:  # OpenSlide reports corrupt tiles with its own error type
        raise SkipInput(
            f"slide region ({item.x}, {item.y}) unreadable: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    return rgb, lr, opts.target_mpp
