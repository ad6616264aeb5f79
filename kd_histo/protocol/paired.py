"""Statistics over seeds: mean ± sd of a model, and the paired difference of two models.

Two models trained with the same seed on the same split are evaluated on the same tiles, so their
difference is measured *paired*: per seed and tile, ``d = correct_a - correct_b``. Its mean over
seeds and tiles is the accuracy difference; its 95% interval comes from a two-way bootstrap that
resamples seeds and tiles (or groups of tiles, e.g. slides or near-duplicate groups) with
replacement, so it holds both the training noise (seeds) and the test-set noise (tiles).

Pure NumPy; no files (``kd_histo.protocol.rows`` reads the predictions, ``kd_histo.protocol.report``
writes the tables).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class SeedStats:
    """A metric over seeds."""

    n: int
    mean: float
    sd: float  # sample standard deviation (n - 1); 0.0 for one seed
    values: tuple[float, ...]


def seed_stats(values: Sequence[float]) -> SeedStats:
    """Mean and sample standard deviation of one metric over seeds."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("no values: need at least one seed")
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return SeedStats(len(v), statistics.fmean(v), sd, tuple(v))


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """Accuracy of model a minus model b, over the same seeds and tiles."""

    mean: float
    low: float
    high: float
    level: float
    n_seeds: int
    n_tiles: int
    per_seed: tuple[float, ...]  # the difference of each seed


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    groups: Sequence | None = None,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> PairedDifference:
    """Paired difference of accuracies with a percentile interval (bootstrap over seeds and tiles).

    Args:
      a, b: correctness (0/1 or bool) [S, T] of two models: row s = seed s, column t = tile t, the
        same tiles in the same order for every seed and both models.
      groups: group of each tile [T] (slide, near-duplicate group); when given, whole groups are
        resampled instead of single tiles.
      n_boot: bootstrap replicates.
      alpha: 0.05 gives a 95% interval.
      seed: random seed (the interval is reproducible).

    Returns:
      The mean difference over seeds and tiles, its interval and the per-seed differences. With one
      seed only the tiles are resampled.
    """
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape != b.shape or a.size == 0:
        raise ValueError(
            f"need two equal, non-empty [seeds, tiles] arrays, got {a.shape} and {b.shape}"
        )
    d = a - b  # [S, T]
    s, t = d.shape
    if groups is None:
        cluster = np.arange(t)
    else:
        if len(groups) != t:
            raise ValueError(f"groups has {len(groups)} entries for {t} tiles")
        cluster = np.unique(np.asarray(groups), return_inverse=True)[1]
    k = int(cluster.max()) + 1
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for lo in range(0, n_boot, 256):  # chunks keep the [B, T] weights small
        n = min(256, n_boot - lo)
        seed_w = rng.multinomial(s, np.full(s, 1.0 / s), size=n) / s  # [n, S]
        tile_w = rng.multinomial(k, np.full(k, 1.0 / k), size=n)[:, cluster].astype(np.float64)
        tile_w /= tile_w.sum(1, keepdims=True)  # [n, T]; a group drawn twice counts twice
        stats[lo : lo + n] = np.einsum("bs,st,bt->b", seed_w, d, tile_w)
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return PairedDifference(
        float(d.mean()), float(low), float(high), 1 - alpha, s, t, tuple(d.mean(1).tolist())
    )
