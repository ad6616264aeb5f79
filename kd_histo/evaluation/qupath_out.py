"""A slide's predictions in the formats of the field: QuPath GeoJSON objects and an OME-TIFF map.

:func:`write_geojson` writes one QuPath object per tile, as QuPath 0.4+ itself writes objects
(``qupath.lib.io.PathObjectTypeAdapters``): a GeoJSON ``FeatureCollection`` whose features carry
an ``id`` (a UUID, here derived from slide and tile so a rerun writes the same file), a square
``Polygon`` in level-0 pixels (origin top left, closed ring of 5 points) and ``properties`` with
``objectType`` ("tile" by default, or "detection"), ``classification`` = ``{"name": class,
"color": [r, g, b]}`` (:func:`class_colours`: a fixed colour per class index) and
``measurements`` as a JSON object ``{name: number}``, the 0.4+ form (0.2/0.3 wrote a list of
``{"name", "value"}``; 0.4+ reads both, 0.3 reads only the list). The measurements are
``prob_<class>`` per class, ``entropy`` (normalised: ``-sum p ln p / ln C``, 0 = one class
certain, 1 = all classes equal) and, in a cascade, ``scored_by_teacher`` (1 = the teacher's
probabilities, 0 = the student's). QuPath imports the file with File > Import objects; tiles are
detections, so Measure > Show measurement maps colours them by any measurement.

:func:`write_probability_tiff` writes the same probabilities as a pyramidal OME-TIFF (tifffile):
one uint8 channel per class named after it, one pixel per tile of the slide's tile grid (value
``round(255 p)``, 0 where no tile was scored), ``PhysicalSizeX/Y`` = the tile's side in µm, and
half-size levels as SubIFDs until the longest side is small. Both writers are atomic, and write
the same bytes for the same tiles (the OME UUID derives from the slide name and the content).

Not here: reading slides or running models (``kd_histo.evaluation.predict``), the heatmap
picture (``kd_histo.evaluation.heatmap``), reading annotations in (``kd_histo.convert``).
"""

from __future__ import annotations

import colorsys
import dataclasses
import hashlib
import json
import os
import uuid
from collections.abc import Sequence

import numpy as np

from kd_histo.atomic import replacing, write_text

OBJECT_TYPES = ("tile", "detection")
# Distinct colours for the first classes (Okabe & Ito's colour-blind-safe set, then tab10's
# greys/olive): fixed by class index, so one class keeps its colour across slides and runs.
_PALETTE = (
    (0, 114, 178),
    (230, 159, 0),
    (0, 158, 115),
    (213, 94, 0),
    (86, 180, 233),
    (204, 121, 167),
    (240, 228, 66),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
# Deterministic UUIDs: uuid5 of "<slide>:<x>:<y>" in this namespace (QuPath wants a UUID id).
_ID_NAMESPACE = uuid.UUID("6f0c2f4e-5b1a-4d1e-9f43-0a5e2b7c9d11")


@dataclasses.dataclass(frozen=True)
class SlideGrid:
    """Where a slide's tiles lie: the grid the predictions (and their OME-TIFF) are laid on.

    Attributes:
      path: the slide file.
      size_l0: tile side in level-0 pixels; tile (x, y) covers [x, x + size_l0) x [y, y + size_l0).
      base_mpp: level-0 µm/px.
      width: level-0 width in pixels.
      height: level-0 height in pixels.
    """

    path: str
    size_l0: int
    base_mpp: float
    width: int
    height: int

    @property
    def tile_um(self) -> float:
        """The tile's side in µm."""
        return self.size_l0 * self.base_mpp

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of whole tiles on the slide."""
        return max(1, self.height // self.size_l0), max(1, self.width // self.size_l0)


def class_colours(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct RGB colours, fixed per class index (a palette, then golden-angle hues)."""
    out = list(_PALETTE[:n])
    for k in range(len(out), n):
        hue = (k * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.85 if k % 2 else 0.65)
        out.append((int(round(255 * r)), int(round(255 * g)), int(round(255 * b))))
    return out


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """``-sum p ln p / ln C`` per row of ``probs`` [N, C]: 0 = certain, 1 = uniform (0 if C=1)."""
    p = np.asarray(probs, np.float64)
    terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    c = p.shape[1]
    return terms.sum(1) / np.log(c) if c > 1 else np.zeros(len(p))


def tile_features(
    slide_id: str,
    coords: Sequence[tuple[int, int]],
    size_l0: int,
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    scored_by_teacher: np.ndarray | None = None,
    object_type: str = "tile",
    ood_scores: np.ndarray | None = None,
) -> dict:
    """The GeoJSON FeatureCollection of a slide's tiles (see the module docstring).

    Args:
      slide_id: the slide's name (part of each feature's UUID).
      coords: level-0 (x, y) of each tile's top-left corner.
      size_l0: tile side in level-0 pixels.
      probs: class probabilities [N, C].
      class_names: the C class names, in the model's order.
      scored_by_teacher: cascade only, [N] bool: which tiles the teacher scored.
      object_type: QuPath's object type, "tile" or "detection".
      ood_scores: [N] out-of-domain scores (measurement ``ood_score``), when the run has them.
    """
    if object_type not in OBJECT_TYPES:
        raise ValueError(
            f"QuPath object type {object_type!r} unknown; choose one of {OBJECT_TYPES}"
        )
    probs = np.asarray(probs, np.float64)
    if probs.shape != (len(coords), len(class_names)):
        raise ValueError(
            f"{len(coords)} tiles and {len(class_names)} classes, but probabilities {probs.shape}"
        )
    colours = class_colours(len(class_names))
    entropy = normalised_entropy(probs)
    features = []
    for i, (x, y) in enumerate(coords):
        x, y, s = int(x), int(y), int(size_l0)
        k = int(probs[i].argmax())
        measurements = {f"prob_{c}": round(float(v), 6) for c, v in zip(class_names, probs[i])}
        measurements["entropy"] = round(float(entropy[i]), 6)
        if scored_by_teacher is not None:
            measurements["scored_by_teacher"] = float(bool(scored_by_teacher[i]))
        if ood_scores is not None:
            measurements["ood_score"] = round(float(ood_scores[i]), 4)
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(_ID_NAMESPACE, f"{slide_id}:{x}:{y}")),
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]],
                },
                "properties": {
                    "objectType": object_type,
                    "classification": {"name": class_names[k], "color": list(colours[k])},
                    "measurements": measurements,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str, collection: dict) -> str:
    """Writes a FeatureCollection from :func:`tile_features` atomically; returns ``path``."""
    write_text(path, json.dumps(collection, separators=(",", ":")))
    return path


def probability_grid(
    grid: SlideGrid, coords: Sequence[tuple[int, int]], probs: np.ndarray
) -> np.ndarray:
    """Probabilities on the slide's tile grid, float [C, rows, cols]; NaN where no tile is."""
    probs = np.asarray(probs, np.float64)
    rows, cols = grid.shape
    out = np.full((probs.shape[1], rows, cols), np.nan)
    for (x, y), p in zip(coords, probs):
        r, c = int(y) // grid.size_l0, int(x) // grid.size_l0
        if 0 <= r < rows and 0 <= c < cols:
            out[:, r, c] = p
    return out


def halve(image: np.ndarray) -> np.ndarray:
    """uint8 [C, h, w] -> [C, ceil(h/2), ceil(w/2)]: the rounded mean of each 2x2 block's pixels
    (a block on an odd edge averages the pixels it has)."""
    c, h, w = image.shape
    h2, w2 = -(-h // 2), -(-w // 2)
    total = np.zeros((c, 2 * h2, 2 * w2), np.float64)
    count = np.zeros((2 * h2, 2 * w2), np.float64)
    total[:, :h, :w] = image
    count[:h, :w] = 1
    total = total.reshape(c, h2, 2, w2, 2).sum((2, 4))
    count = count.reshape(h2, 2, w2, 2).sum((1, 3))
    return np.floor(total / count + 0.5).astype(np.uint8)


def pyramid(image: np.ndarray, smallest: int = 64) -> list[np.ndarray]:
    """``image`` [C, h, w] and its halvings until the longest side is at most ``smallest``."""
    levels = [image]
    while max(levels[-1].shape[1:]) > smallest:
        levels.append(halve(levels[-1]))
    return levels


def write_probability_tiff(
    path: str,
    grid: SlideGrid,
    coords: Sequence[tuple[int, int]],
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    smallest: int = 64,
) -> str:
    """The pyramidal OME-TIFF of a slide's probabilities (module docstring); returns ``path``."""
    import tifffile

    values = probability_grid(grid, coords, probs)
    image = np.where(np.isnan(values), 0, np.floor(255 * values + 0.5)).astype(np.uint8)
    levels = pyramid(image, smallest)
    # The file's OME UUID from its name and content, not tifffile's time-based one: a rerun (or a
    # task of a job array) writes the same bytes.
    digest = hashlib.sha256(image.tobytes() + repr(list(class_names)).encode()).hexdigest()
    metadata = {
        "axes": "CYX",
        "UUID": str(uuid.uuid5(_ID_NAMESPACE, f"{_stem(grid.path)}:probabilities:{digest}")),
        "Name": _stem(grid.path),
        "Channel": {"Name": list(class_names)},
        "PhysicalSizeX": grid.tile_um,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": grid.tile_um,
        "PhysicalSizeYUnit": "µm",
    }
    # Tiled, deflate-compressed pages (zlib is built into tifffile; QuPath's Bio-Formats reads it)
    options = {"photometric": "minisblack", "compression": "zlib", "tile": (256, 256)}
    # ome=True: the temporary name does not end in .ome.tif, which is how tifffile would guess
    with replacing(path) as tmp, tifffile.TiffWriter(tmp, ome=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, metadata=metadata, **options)
        for level in levels[1:]:
            tif.write(level, subfiletype=1, metadata=None, **options)
    return path


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]
