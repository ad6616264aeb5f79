"""A slide's class probabilities drawn over its thumbnail: one picture per class asked.

The thumbnail is :func:`kd_histo.convert.slides.thumbnail`, read in blocks from a low pyramid
level (OpenSlide's ``get_thumbnail`` reads a whole level at once: on a single-level slide, all of
level 0). Each picture has two panels: the thumbnail as scanned, and the same thumbnail in grey
with the probability drawn over it in viridis. Why these colours: H&E is pink (eosin) and purple
(haematoxylin), and a map in magma or jet shares those hues and vanishes into the tissue. Drawn
over a grey copy of the thumbnail, the map is the only colour in its panel; viridis gives every
value a hue (cividis, also colour-blind-safe, is grey at its middle and fades into the grey
tissue), rises monotonically in lightness, and reads the same to colour-blind eyes. The first
panel keeps the tissue's own colours to compare with.

Not here: the probabilities' files (``kd_histo.evaluation.qupath_out``), the model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: binaries run headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from kd_histo.atomic import replacing  # noqa: E402
from kd_histo.evaluation.qupath_out import SlideGrid, probability_grid  # noqa: E402

CMAP = "viridis"
ALPHA = 0.7


def check_classes(class_names: Sequence[str], asked: Sequence[str]) -> None:
    """One line naming a class of ``--heatmap_classes`` that the model does not have."""
    for name in asked:
        if name not in class_names:
            raise ValueError(
                f"--heatmap_classes: {name!r} is no class of the model; choose from "
                f"{', '.join(class_names)}"
            )


def heatmap_classes(probs: np.ndarray, class_names: Sequence[str], asked: Sequence[str]) -> list:
    """Class indices to draw: ``asked`` (names, checked), else the class of highest mean
    probability over the slide (the one picture drawn by default)."""
    check_classes(class_names, asked)
    if asked:
        return [list(class_names).index(n) for n in asked]
    return [int(np.asarray(probs).mean(0).argmax())]


def write_heatmaps(
    grid: SlideGrid,
    slide_id: str,
    coords: Sequence[tuple[int, int]],
    probs: np.ndarray,
    class_names: Sequence[str],
    out_dir: str,
    asked: Sequence[str] = (),
) -> list[str]:
    """Writes ``<slide>.png`` (default: the top class) or ``<slide>_<class>.png`` per class asked.

    Returns:
      the paths written, in the order of the classes.
    """
    from kd_histo.convert import slides

    classes = heatmap_classes(probs, class_names, asked)
    os.makedirs(out_dir, exist_ok=True)
    slide = slides.open_slide(grid.path)
    try:
        thumb = slides.thumbnail(slide, 1024)
    finally:
        slide.close()
    values = probability_grid(grid, coords, probs)
    rows, cols = grid.shape
    # the grid covers whole tiles only: crop the thumbnail to the same area so cells line up
    th = max(1, int(round(thumb.shape[0] * rows * grid.size_l0 / grid.height)))
    tw = max(1, int(round(thumb.shape[1] * cols * grid.size_l0 / grid.width)))
    thumb = thumb[:th, :tw]
    paths = []
    for k in classes:
        name = f"{slide_id}.png" if not asked else f"{slide_id}_{_safe(class_names[k])}.png"
        paths.append(
            heatmap_png(
                thumb,
                values[k],
                os.path.join(out_dir, name),
                title=f"{slide_id}: P({class_names[k]})",
            )
        )
    return paths


def heatmap_png(thumbnail: np.ndarray, grid: np.ndarray, path: str, title: str = "") -> str:
    """A [rows, cols] probability map (NaN = no tile) beside and over an RGB thumbnail."""
    h, w = thumbnail.shape[:2]
    fig, axes = plt.subplots(1, 2, figsize=(12, 6 * h / max(w, 1) + 0.8))
    axes[0].imshow(thumbnail)
    axes[0].set_title("slide")
    grey = thumbnail.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    axes[1].imshow(grey, cmap="gray", vmin=0, vmax=255)
    im = axes[1].imshow(
        np.ma.masked_invalid(grid),
        cmap=CMAP,
        alpha=ALPHA,
        vmin=0,
        vmax=1,
        interpolation="nearest",
        extent=(0, w, h, 0),
    )
    axes[1].set_title(title)
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def _safe(name: str) -> str:
    """A class name as part of a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"
