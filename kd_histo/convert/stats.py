"""Per-channel pixel mean and standard deviation in [0, 1], accumulated in parts and merged.

Sums are kept in float64 (sum, sum of squares, pixel count) so parts computed by different workers
or machines merge exactly in any order. This module does not choose which split is counted.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class PixelStats:
    """Running per-channel sums of RGB values scaled to [0, 1]."""

    total: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0, 0.0])
    total_sq: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0, 0.0])
    count: int = 0

    def add(self, rgb: np.ndarray) -> None:
        """Adds the pixels of a uint8 [..., 3] image."""
        px = rgb.reshape(-1, 3).astype(np.float64) / 255.0
        self.total = (np.asarray(self.total) + px.sum(0)).tolist()
        self.total_sq = (np.asarray(self.total_sq) + (px * px).sum(0)).tolist()
        self.count += len(px)

    def merge(self, other: PixelStats) -> PixelStats:
        """Returns the stats of both parts together."""
        return PixelStats(
            (np.asarray(self.total) + other.total).tolist(),
            (np.asarray(self.total_sq) + other.total_sq).tolist(),
            self.count + other.count,
        )

    def mean_std(self) -> tuple[list[float], list[float]]:
        """``(mean, std)`` per channel; std floored at 1e-6 so normalising never divides by 0."""
        if self.count == 0:
            raise ValueError("no pixels counted")
        mean = np.asarray(self.total) / self.count
        var = np.maximum(np.asarray(self.total_sq) / self.count - mean**2, 0.0)
        return mean.round(6).tolist(), np.maximum(np.sqrt(var), 1e-6).round(6).tolist()
