"""Groups augmented copies of one original image (``--group_by=near_duplicates``).

Sets such as LC25000 were made by rotating (by arbitrary angles), flipping, zooming, cropping and
re-encoding a few hundred originals; a split by file then leaks near-copies of a test tile into
train. Each tile is reduced to a small thumbnail and two signatures:

- **structure**: the per-image standardised grey image sampled on a log-polar grid around the
  centre. A rotation about the centre is a circular shift along the angle axis, a flip reverses it,
  a zoom is a shift along the log-radius axis; the score of a pair is the best normalised
  cross-correlation over all angle shifts, both flips and a few radius shifts (computed with FFTs).
  Standardising the grey image makes it blind to brightness, contrast and colour shifts.
- **colour**: a histogram of the pixels' chromaticity (r, g of r+g+b), compared with the
  Bhattacharyya coefficient. It ignores where pixels lie, so it also matches off-centre crops and
  strong zooms that the structure score misses; it does not survive colour shifts (the structure
  score does), so a colour link also needs a modest structure score.

Candidates come from nearest neighbours (a rotation-invariant ring descriptor for structure, the
histogram for colour); a pair is linked when its score clears the threshold of its signature and
the two tiles have no conflicting labels (copies of one original share its label). Links join
groups (union-find, strongest first) unless the joined group would exceed ``max_group_share`` of
all tiles, so a chain of weak links cannot merge the whole set.

Tuned on LC25000 lung against the published true originals (see BUILD_NOTES.md for the measured
precision, recall and leakage). Cost: a kNN over all tiles (O(N^2) dot products, chunked) and a few
FFTs per candidate pair; fine for tens of thousands of tiles. This module reads no files and
chooses no splits.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class NearDupOptions:
    """Settings of the near-duplicate grouping (defaults tuned on LC25000 lung).

    Attributes:
      thumb_px: side of the square thumbnail every signature is computed from.
      radii: log-spaced radii of the polar grid (from 2 px to the inscribed circle).
      angles: angles of the polar grid.
      max_zoom_shift: radius shifts searched each way (one shift is a zoom of
        (r_max / r_min) ** (1 / (radii - 1)), about 12% with the defaults).
      candidates: structure neighbours verified per tile.
      structure_threshold: normalised cross-correlation that links a pair (0-1).
      colour_neighbours: colour neighbours linked per tile when similar enough.
      colour_threshold: Bhattacharyya coefficient of the chromaticity histograms that links a pair.
      colour_min_structure: a colour link also needs this structure score (unrelated tiles
        score about 0.3; crops and zooms of one original about 0.6-0.9).
      colour_bins: histogram bins per chromaticity axis (over the set's 0.5-99.5 percentile range).
      max_group_share: no group grows beyond this share of all tiles...
      min_group_cap: ...or beyond this many tiles, whichever is larger (small sets).
    """

    thumb_px: int = 64
    radii: int = 24
    angles: int = 64
    max_zoom_shift: int = 3
    candidates: int = 10
    structure_threshold: float = 0.7
    colour_neighbours: int = 5
    colour_threshold: float = 0.975
    colour_min_structure: float = 0.4
    colour_bins: int = 16
    max_group_share: float = 0.03
    min_group_cap: int = 32


@dataclasses.dataclass(frozen=True)
class TileSignature:
    """What the grouping needs of one tile (small and picklable: workers compute it)."""

    polar: np.ndarray  # float16 [radii, angles], standardised grey on the log-polar grid
    chroma: np.ndarray  # uint8 [2, P]: r and g chromaticity of the thumbnail's pixels, x 255


def _bilinear(img: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    h, w = img.shape
    y0 = np.clip(np.floor(yy).astype(int), 0, h - 2)
    x0 = np.clip(np.floor(xx).astype(int), 0, w - 2)
    fy, fx = yy - y0, xx - x0
    return (
        img[y0, x0] * (1 - fy) * (1 - fx)
        + img[y0, x0 + 1] * (1 - fy) * fx
        + img[y0 + 1, x0] * fy * (1 - fx)
        + img[y0 + 1, x0 + 1] * fy * fx
    )


def signature(rgb: np.ndarray, opts: NearDupOptions = NearDupOptions()) -> TileSignature:
    """The structure and colour signature of one uint8 RGB tile [H, W, 3]."""
    n = opts.thumb_px
    thumb = np.asarray(Image.fromarray(rgb).resize((n, n), Image.BOX), np.float32)
    grey = thumb @ np.array([0.299, 0.587, 0.114], np.float32)
    grey = (grey - grey.mean()) / (grey.std() + 1e-6)
    c = (n - 1) / 2
    r = np.geomspace(2.0, n / 2 - 1, opts.radii)[:, None]
    a = (np.arange(opts.angles) * 2 * np.pi / opts.angles)[None, :]
    polar = _bilinear(grey, c + r * np.sin(a), c + r * np.cos(a))
    polar = (polar - polar.mean()) / (polar.std() + 1e-6)
    s = thumb.sum(-1) + 1e-6
    chroma = np.stack([thumb[..., 0] / s, thumb[..., 1] / s]).reshape(2, -1)
    return TileSignature(polar.astype(np.float16), np.round(chroma * 255).astype(np.uint8))


def ring_descriptor(polar: np.ndarray, harmonics: int = 16) -> np.ndarray:
    """Rotation- and flip-invariant vectors [N, D]: |FFT| along each ring, log, centred, unit."""
    m = np.log1p(np.abs(np.fft.rfft(polar.astype(np.float32), axis=-1))[..., : harmonics + 1])
    d = m.reshape(len(polar), -1)
    d = d - d.mean(0)
    return d / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-9)


def colour_histograms(chroma: np.ndarray, bins: int) -> np.ndarray:
    """Square-rooted chromaticity histograms [N, bins^2] (unit norm: dot = Bhattacharyya)."""
    r, g = chroma[:, 0].astype(np.float32), chroma[:, 1].astype(np.float32)
    lo = [np.percentile(r, 0.5), np.percentile(g, 0.5)]
    hi = [max(np.percentile(r, 99.5), lo[0] + 1), max(np.percentile(g, 99.5), lo[1] + 1)]
    ri = np.clip(((r - lo[0]) / (hi[0] - lo[0]) * bins).astype(int), 0, bins - 1)
    gi = np.clip(((g - lo[1]) / (hi[1] - lo[1]) * bins).astype(int), 0, bins - 1)
    code = ri * bins + gi + (np.arange(len(chroma)) * bins * bins)[:, None]
    h = np.bincount(code.ravel(), minlength=len(chroma) * bins * bins).astype(np.float32)
    h = np.sqrt(h.reshape(len(chroma), bins * bins) / chroma.shape[-1])
    return h


def nearest(x: np.ndarray, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar rows (dot product) of each row of ``x``, itself excluded.

    Returns:
      ``(index int64 [N, k], similarity float32 [N, k])``, most similar first.
    """
    n = len(x)
    k = min(k, n - 1)
    x = x.astype(np.float32)
    idx = np.zeros((n, k), np.int64)
    sim = np.zeros((n, k), np.float32)
    for s in range(0, n, chunk):
        d = x[s : s + chunk] @ x.T
        d[np.arange(len(d)), np.arange(s, s + len(d))] = -np.inf
        part = np.argpartition(-d, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(d, part, 1)
        order = np.argsort(-ps, 1, kind="stable")
        idx[s : s + chunk] = np.take_along_axis(part, order, 1)
        sim[s : s + chunk] = np.take_along_axis(ps, order, 1)
    return idx, sim


def structure_scores(
    polar: np.ndarray, i: np.ndarray, j: np.ndarray, max_shift: int, chunk: int = 4096
) -> np.ndarray:
    """Best normalised cross-correlation of pairs (i, j) over rotations, flips and zooms.

    Args:
      polar: float [N, radii, angles] log-polar images.
      i, j: int [P] pair members.
      max_shift: radius shifts (zoom steps) searched each way.

    Returns:
      float32 [P] in [-1, 1]; 1 for a tile and an exact rotated or flipped copy of it.
    """
    p = polar.astype(np.float32)
    nr, na = p.shape[1:]
    spec = np.fft.rfft(p, axis=-1)
    spec_flip = np.fft.rfft(p[:, :, ::-1], axis=-1)
    energy = (p**2).sum(-1)  # [N, radii]
    cum = np.concatenate([np.zeros((len(p), 1), np.float32), np.cumsum(energy, 1)], 1)
    out = np.full(len(i), -1.0, np.float32)
    for s in range(0, len(i), chunk):
        a, b = i[s : s + chunk], j[s : s + chunk]
        best = np.full(len(a), -1.0, np.float32)
        fa = np.conj(spec[a])
        for fb in (spec[b], spec_flip[b]):
            for dr in range(-max_shift, max_shift + 1):
                a0, a1 = max(0, -dr), min(nr, nr - dr)
                c = np.fft.irfft((fa[:, a0:a1] * fb[:, a0 + dr : a1 + dr]).sum(1), n=na, axis=-1)
                den = (
                    np.sqrt((cum[a, a1] - cum[a, a0]) * (cum[b, a1 + dr] - cum[b, a0 + dr])) + 1e-9
                )
                best = np.maximum(best, c.max(-1) / den)
        out[s : s + chunk] = best
    return out


def link(n: int, pairs: list[tuple[int, int]], cap: int) -> np.ndarray:
    """Union-find over ``pairs`` in the given order, refusing a union that would exceed ``cap``.

    Returns:
      int64 [N] group index per item, numbered by first member (depends only on the input).
    """
    parent = np.arange(n)
    size = np.ones(n, np.int64)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb and size[ra] + size[rb] <= cap:
            ra, rb = min(ra, rb), max(ra, rb)
            parent[rb] = ra
            size[ra] += size[rb]
    roots = np.array([find(x) for x in range(n)])
    _, first = np.unique(roots, return_index=True)
    order = {root: k for k, root in enumerate(roots[np.sort(first)])}
    return np.array([order[r] for r in roots], np.int64)


def near_pairs(
    sigs: list[TileSignature],
    labels: list[int] | None = None,
    opts: NearDupOptions = NearDupOptions(),
) -> list[tuple[int, int]]:
    """The near-copy links between tiles, strongest first (structure links, then colour links).

    Args:
      sigs: one :func:`signature` per tile.
      labels: class index per tile (-1 = unknown); tiles with different known labels are never
        linked (copies of one original share its label). None = all unknown.
      opts: thresholds and sizes.
    """
    n = len(sigs)
    if n < 2:
        return []
    lab = np.asarray(labels if labels is not None else [-1] * n)
    polar = np.stack([s.polar for s in sigs])
    cand, _ = nearest(ring_descriptor(polar), opts.candidates)
    i = np.repeat(np.arange(n), cand.shape[1])
    j = cand.ravel()
    st = structure_scores(polar, i, j, opts.max_zoom_shift)
    ci, cs = nearest(
        colour_histograms(np.stack([s.chroma for s in sigs]), opts.colour_bins),
        opts.colour_neighbours,
    )

    def same_label(a, b):
        return (lab[a] < 0) | (lab[b] < 0) | (lab[a] == lab[b])

    keep = (st >= opts.structure_threshold) & same_label(i, j)
    # Structure links first (they also hold under colour shifts), strongest first; then colour.
    order = np.argsort(-st[keep], kind="stable")
    pairs = list(zip(i[keep][order].tolist(), j[keep][order].tolist()))
    ci_i = np.repeat(np.arange(n), ci.shape[1])
    ci_j, cs = ci.ravel(), cs.ravel()
    keep = (cs >= opts.colour_threshold) & same_label(ci_i, ci_j)
    ci_i, ci_j, cs = ci_i[keep], ci_j[keep], cs[keep]
    keep = structure_scores(polar, ci_i, ci_j, opts.max_zoom_shift) >= opts.colour_min_structure
    order = np.argsort(-cs[keep], kind="stable")
    pairs += list(zip(ci_i[keep][order].tolist(), ci_j[keep][order].tolist()))
    return pairs


def group_near_duplicates(
    sigs: list[TileSignature],
    labels: list[int] | None = None,
    opts: NearDupOptions = NearDupOptions(),
    pairs: list[tuple[int, int]] | None = None,
) -> np.ndarray:
    """Group index per tile: augmented copies of one original share a group.

    Args:
      sigs: one :func:`signature` per tile.
      labels: class index per tile (-1 = unknown), see :func:`near_pairs`.
      opts: thresholds and sizes.
      pairs: the links of :func:`near_pairs`, when already computed.

    Returns:
      int64 [N] group indices, numbered by first member; no group larger than
      ``max(min_group_cap, max_group_share * N)``.
    """
    n = len(sigs)
    if pairs is None:
        pairs = near_pairs(sigs, labels, opts)
    cap = max(opts.min_group_cap, int(opts.max_group_share * n))
    return link(n, pairs, cap)


def pair_precision_recall(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """Pairwise precision and recall of a grouping against true groups.

    Precision: of the pairs put in one predicted group, the share that share a true group;
    recall: of the pairs that share a true group, the share put in one predicted group.
    """

    def pairs(keys) -> int:
        return sum(c * (c - 1) // 2 for c in collections.Counter(keys).values())

    both = pairs(zip(np.asarray(pred).tolist(), np.asarray(true).tolist()))
    p, t = pairs(np.asarray(pred).tolist()), pairs(np.asarray(true).tolist())
    return (both / p if p else 1.0), (both / t if t else 1.0)
