"""Tissue detection on a slide thumbnail: Otsu's threshold on colour, morphology, speck removal.

``detect(rgb, method, min_area_px)`` turns a uint8 RGB thumbnail into a boolean tissue mask:

- ``otsu`` (the conversion's default): Otsu's threshold (1979) on the chroma, max - min of the
  three channels (HSV's chroma, i.e. saturation not divided by the value, so the near-black
  borders some scanners leave and the dark noise in them do not count as colour). Glass is
  grey-white (chroma a few units), H&E stains it (pink and purple, tens of units and more); the
  threshold maximising the between-class variance of the chroma histogram separates the two on
  each slide, however pale or dark its staining. The mask is then closed and opened with a small
  disk (fills pinholes and gaps between nuclei, removes isolated pixels), and connected pieces
  (8-connected) smaller than ``min_area_px`` (dust, specks, debris) are dropped.
- ``threshold`` (the earlier fixed rule, kept for prediction and as an option): chroma >= 20 and
  mean <= 230, per pixel, no morphology.

Everything here is a pure NumPy function of arrays; reading the thumbnail is
``kd_histo.convert.slides``'s job.
"""

from __future__ import annotations

import dataclasses

import numpy as np

TISSUE_METHODS = ("otsu", "threshold")
# On a slide with no tissue, Otsu splits the glass's own noise. Thresholds below this chroma are
# raised to it: glass on a thumbnail stays under ~5 (CMU-1: 99th percentile 5; raw per-pixel noise
# of sigma 3 reaches ~12), H&E tissue is tens (CMU-1: median 52), the fixed rule uses 20.
OTSU_MIN_CHROMA = 15
MORPH_RADIUS_PX = 2  # disk radius of the close/open, in thumbnail pixels


@dataclasses.dataclass(frozen=True)
class TissueMask:
    """The tissue found on a thumbnail.

    Attributes:
      mask: bool [h, w], True = tissue.
      method: "otsu" or "threshold".
      threshold: the chroma above which a pixel is tissue (Otsu's, after the floor), or the fixed
        rule's minimum chroma.
    """

    mask: np.ndarray = dataclasses.field(compare=False, repr=False)
    method: str
    threshold: int

    @property
    def fraction(self) -> float:
        """Share of the thumbnail that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def chroma(rgb: np.ndarray) -> np.ndarray:
    """uint8 max - min over the channels of uint8 RGB [..., 3]."""
    return (rgb.max(-1).astype(np.int16) - rgb.min(-1)).astype(np.uint8)


def is_tissue(rgb: np.ndarray, min_saturation: int = 20, max_brightness: int = 230) -> np.ndarray:
    """Per-pixel tissue test of uint8 RGB: max-min channel spread >= min_saturation, mean <= max."""
    rgb = rgb.astype(np.int16)
    spread = rgb.max(-1) - rgb.min(-1)
    return (spread >= min_saturation) & (rgb.mean(-1) <= max_brightness)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the t maximising the between-class variance of
    ``values <= t`` and ``values > t`` (the first such t; 0 when all values are equal)."""
    hist = np.bincount(np.asarray(values, np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    p = hist / total
    omega = np.cumsum(p)[:-1]  # weight of the lower class, t = 0..254
    mu = np.cumsum(p * np.arange(256))[:-1]
    mu_t = float(np.sum(p * np.arange(256)))
    denom = omega * (1.0 - omega)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma_b = np.where(denom > 1e-12, (mu_t * omega - mu) ** 2 / denom, -1.0)
    if sigma_b.max() <= 0:
        return 0
    return int(np.argmax(sigma_b))


def disk(radius: int) -> np.ndarray:
    """bool [2r+1, 2r+1] disk: offsets (dy, dx) with dy^2 + dx^2 <= r^2."""
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius


def _shifts(mask: np.ndarray, selem: np.ndarray, fill: bool, combine) -> np.ndarray:
    h, w = mask.shape
    ry, rx = selem.shape[0] // 2, selem.shape[1] // 2
    padded = np.full((h + 2 * ry, w + 2 * rx), fill, bool)
    padded[ry : ry + h, rx : rx + w] = mask
    out = None
    for dy, dx in zip(*np.nonzero(selem)):
        view = padded[dy : dy + h, dx : dx + w]
        out = view.copy() if out is None else combine(out, view, out=out)
    return out


def dilate(mask: np.ndarray, selem: np.ndarray) -> np.ndarray:
    """Binary dilation by a symmetric structuring element; outside the image is background."""
    return _shifts(mask, selem, False, np.logical_or)


def erode(mask: np.ndarray, selem: np.ndarray) -> np.ndarray:
    """Binary erosion by a symmetric structuring element; outside the image counts as foreground
    (tissue cut by the slide's edge is not eroded from it)."""
    return _shifts(mask, selem, True, np.logical_and)


def close_open(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing, then opening, with a disk of ``radius`` (0 = unchanged)."""
    if radius <= 0:
        return mask.copy()
    se = disk(radius)
    closed = erode(dilate(mask, se), se)
    return dilate(erode(closed, se), se)


def _runs(mask: np.ndarray):
    """Horizontal runs of True: (row, start, end exclusive), row-major."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)
    return rows, starts, ends


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a bool mask: int32 labels (0 = background, 1..n) and n.

    Runs of each row are linked to the overlapping (or diagonally touching) runs of the row
    above with a union-find, so the cost grows with the number of runs, not of pixels.
    """
    h, w = mask.shape
    rows, starts, ends = _runs(mask)
    n = len(rows)
    labels = np.zeros((h, w), np.int32)
    if n == 0:
        return labels, 0
    width = w + 2
    key_s, key_e = rows * width + starts, rows * width + ends
    # For each run b of row r, the runs a of row r-1 with a.end >= b.start and a.start <= b.end.
    lo = np.searchsorted(key_e, (rows - 1) * width + starts, "left")
    hi = np.searchsorted(key_s, (rows - 1) * width + ends, "right")
    count = np.maximum(hi - lo, 0) * (rows > 0)
    b_idx = np.repeat(np.arange(n), count)
    a_idx = np.repeat(lo, count) + (
        np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    )
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in zip(a_idx.tolist(), b_idx.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(n)])
    _, comp = np.unique(roots, return_inverse=True)  # numbered in order of first run
    for r, s, e, c in zip(rows.tolist(), starts.tolist(), ends.tolist(), comp.tolist()):
        labels[r, s:e] = c + 1
    return labels, int(comp.max()) + 1


def remove_small(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """The mask without its 8-connected pieces of fewer than ``min_area_px`` pixels."""
    if min_area_px <= 0 or not mask.any():
        return mask.copy()
    labels, _ = label_components(mask)
    area = np.bincount(labels.ravel())
    keep = area >= min_area_px
    keep[0] = False
    return keep[labels]


def detect(rgb: np.ndarray, method: str = "otsu", min_area_px: float = 0.0) -> TissueMask:
    """Tissue of a uint8 RGB thumbnail (see the module docstring).

    Args:
      rgb: uint8 [h, w, 3].
      method: "otsu" or "threshold".
      min_area_px: with otsu, connected pieces smaller than this many thumbnail pixels are dropped.
    """
    if method == "threshold":
        return TissueMask(is_tissue(rgb), method, 20)
    if method != "otsu":
        raise ValueError(
            f"tissue method must be one of {', '.join(TISSUE_METHODS)}, got {method!r}"
        )
    c = chroma(rgb)
    t = max(otsu_threshold(c), OTSU_MIN_CHROMA)
    mask = close_open(c > t, MORPH_RADIUS_PX)
    return TissueMask(remove_small(mask, min_area_px), method, t)
