"""A picture per slide of what a conversion kept: ``<out_dir>/qc/<slide_id>.png``.

The slide's thumbnail (the one tissue was found on) with the outline of every grid tile: green
where the tile was kept, red where it was dropped as background; annotation outlines in one colour
per class (neither green nor red); and a line of text under it (tiles kept, the tissue method, its
threshold and the tissue share). A user sees at a glance what went into the shards. (With
``--tissue_method=threshold`` a green tile whose own pixels then fail the fixed rule is still
dropped when read; dataset.json's notes count those.)

:func:`draw` is a pure function of arrays; :func:`write_slide_qc` writes the PNG atomically.
This module does not find tissue or plan tiles (``kd_histo.convert.slides``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from kd_histo.atomic import replacing
from kd_histo.convert.slides import SlidePlan

QC_DIR = "qc"
KEPT = (0, 200, 0)
DROPPED = (230, 0, 0)
# Annotation classes, in the order given (then again from the first).
CLASS_COLOURS = (
    ("blue", (0, 90, 255)),
    ("orange", (255, 140, 0)),
    ("cyan", (0, 200, 220)),
    ("magenta", (200, 0, 200)),
    ("yellow", (240, 220, 0)),
    ("black", (0, 0, 0)),
    ("brown", (120, 60, 0)),
    ("lilac", (128, 128, 255)),
)
LEGEND_PX = 14

# (class name, [level-0 (x, y) rings, each float [N, 2]])
Annotations = Sequence[tuple[str, Sequence[np.ndarray]]]


def qc_path(out_dir: str, slide_id: str) -> str:
    """Where the picture of ``slide_id`` is written."""
    return os.path.join(out_dir, QC_DIR, f"{slide_id}.png")


def grid_boxes(plan: SlidePlan) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Level-0 corners of the kept and the dropped grid tiles of ``plan``."""
    width, height = plan.dims
    kept = set(plan.coords)
    grid = [
        (i * plan.size_l0, j * plan.size_l0)
        for j in range(height // plan.size_l0)
        for i in range(width // plan.size_l0)
    ]
    return [c for c in grid if c in kept], [c for c in grid if c not in kept]


def draw(
    thumb: np.ndarray,
    dims: tuple[int, int],
    size_l0: int,
    kept: Sequence[tuple[int, int]],
    dropped: Sequence[tuple[int, int]],
    annotations: Annotations | None = None,
    legend: str = "",
) -> np.ndarray:
    """The qc picture: uint8 RGB [h + legend strip, w, 3].

    Args:
      thumb: uint8 RGB thumbnail of the whole slide.
      dims: the slide's level-0 (width, height).
      size_l0: tile side in level-0 pixels.
      kept, dropped: level-0 (x, y) corners of the kept and dropped tiles.
      annotations: optional (class name, level-0 rings) per class, drawn as closed outlines.
      legend: text written under the thumbnail ("" = no strip).
    """
    h, w = thumb.shape[:2]
    sx, sy = w / dims[0], h / dims[1]
    img = Image.new("RGB", (w, h + (LEGEND_PX if legend else 0)), (255, 255, 255))
    img.paste(Image.fromarray(thumb), (0, 0))
    pen = ImageDraw.Draw(img)

    def box(x: int, y: int, colour) -> None:
        x0, y0 = int(x * sx), int(y * sy)
        x1 = max(x0, int(round((x + size_l0) * sx)) - 1)
        y1 = max(y0, int(round((y + size_l0) * sy)) - 1)
        pen.rectangle((x0, y0, x1, y1), outline=colour)

    for x, y in dropped:
        box(x, y, DROPPED)
    for x, y in kept:  # over the red: a kept tile's edges stay green
        box(x, y, KEPT)
    for k, (_name, rings) in enumerate(annotations or ()):
        colour = CLASS_COLOURS[k % len(CLASS_COLOURS)][1]
        for ring in rings:
            pts = [(float(px) * sx, float(py) * sy) for px, py in np.asarray(ring, float)]
            if len(pts) >= 2:
                pen.line(pts + pts[:1], fill=colour, width=2)
    if legend:
        pen.text((2, h + 1), legend, fill=(0, 0, 0))
    return np.asarray(img)


def write_slide_qc(
    out_dir: str, slide_id: str, plan: SlidePlan, annotations: Annotations | None = None
) -> str:
    """Writes ``qc/<slide_id>.png`` (a plan made with ``keep_thumbnail=True``); returns the path."""
    if plan.thumbnail is None:
        raise ValueError("the slide plan has no thumbnail: plan it with keep_thumbnail=True")
    kept, dropped = grid_boxes(plan)
    rule = (
        f"otsu, chroma > {plan.tissue_threshold}"
        if plan.tissue_method == "otsu"
        else f"threshold, chroma >= {plan.tissue_threshold}"
    )
    legend = (
        f"{len(kept)} kept (green), {len(dropped)} dropped (red); tissue ({rule}): "
        f"{plan.tissue_fraction:.1%}"
    )
    if annotations:
        legend += "; " + ", ".join(
            f"{name}: {CLASS_COLOURS[k % len(CLASS_COLOURS)][0]}"
            for k, (name, _) in enumerate(annotations)
        )
    rgb = draw(plan.thumbnail, plan.dims, plan.size_l0, kept, dropped, annotations, legend)
    path = qc_path(out_dir, slide_id)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with replacing(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return path


def by_class(outlines):
    """[(class, ring)] -> [(class, [rings])] in order of first appearance; None stays None."""
    if outlines is None:
        return None
    grouped: dict[str, list] = {}
    for name, ring in outlines:
        grouped.setdefault(name, []).append(ring)
    return list(grouped.items())
