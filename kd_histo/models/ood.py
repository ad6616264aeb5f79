"""How far a tile is from the training data: class-conditional Gaussians of the net's embedding.

At the end of training a run measures, on its labeled training tiles, one Gaussian per class of
the embedding (the last feature map, average-pooled: what the classifier reads) with a shared
covariance, as in Lee et al., "A simple unified framework for detecting out-of-distribution
samples and adversarial attacks" (NeurIPS 2018). A tile's score is its squared Mahalanobis
distance to the nearest class mean; the threshold is the score that ``flag_fraction`` (5%) of the
validation tiles exceed, so a tile above it is "unlike anything the model was trained on". A
slide whose flagged fraction is above ``--ood_warn_fraction`` gets a warning.

The score costs one [B, D] x [D, D] product and one [B, D] x [D, K] product per batch (D = the
embedding width, 256 at paper widths): small beside the net. Not here: where the embedding comes
from (the models' ``features`` output) and the file the statistics live in (the run folder,
written by training).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from kd_histo import atomic

OOD_FILE = "ood.npz"
FLAG_FRACTION = 0.05  # of the validation tiles above the threshold, by construction
WARN_FRACTION = 0.5  # a slide with more of its tiles flagged than this gets a warning
NO_STATS = (
    "this run has no out-of-domain statistics (trained without a val split, or before kd_histo "
    "measured them): no ood_score / ood_flag columns"
)
SHRINKAGE = 1e-3  # ridge on the shared covariance, relative to its mean variance


@dataclasses.dataclass(frozen=True)
class OODStats:
    """Class means, shared precision and calibrated threshold of one run's embedding.

    Attributes:
      means: [K, D] class means of the embedding on the training tiles.
      precision: [D, D] inverse of the shared (tied, shrunk) covariance.
      threshold: squared Mahalanobis distance above which a tile is flagged.
      flag_fraction: the fraction of validation tiles above the threshold when it was calibrated.
      num_fit: training tiles the Gaussians were measured on.
      num_calibration: validation tiles the threshold was calibrated on.
    """

    means: np.ndarray
    precision: np.ndarray
    threshold: float
    flag_fraction: float = FLAG_FRACTION
    num_fit: int = 0
    num_calibration: int = 0

    def __post_init__(self):
        k, d = np.shape(self.means)
        if np.shape(self.precision) != (d, d):
            raise ValueError(f"ood: precision must be [{d}, {d}], got {np.shape(self.precision)}")
        if not (np.isfinite(self.means).all() and np.isfinite(self.precision).all()):
            raise ValueError("ood: statistics are not finite")
        if not np.isfinite(self.threshold):
            raise ValueError(f"ood: threshold {self.threshold} is not finite")

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each [N, D] embedding to its nearest class mean."""
        return mahalanobis_min(embeddings, self.means, self.precision)

    def flags(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, flagged) for [N, D] embeddings."""
        s = self.scores(embeddings)
        return s, s > self.threshold

    def save(self, run_dir: str) -> str:
        path = os.path.join(run_dir, OOD_FILE)
        meta = {
            k: getattr(self, k)
            for k in ("threshold", "flag_fraction", "num_fit", "num_calibration")
        }
        with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, means=self.means, precision=self.precision, meta=json.dumps(meta))
        return path

    @classmethod
    def load(cls, run_dir: str) -> OODStats | None:
        """The run's statistics, or None for a run trained before they existed."""
        path = os.path.join(run_dir, OOD_FILE)
        if not os.path.exists(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                return cls(means=z["means"], precision=z["precision"], **meta)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path}: unreadable out-of-domain statistics ({e}); retrain or "
                "delete the file to predict without the flag"
            ) from None


def embed(feature_maps: np.ndarray) -> np.ndarray:
    """[N, h, w, C] feature maps -> [N, C] embeddings (global average pool), float64."""
    return np.asarray(feature_maps, np.float64).mean(axis=(1, 2))


def fit_gaussians(
    embeddings: np.ndarray, labels: np.ndarray, num_classes: int, shrinkage: float = SHRINKAGE
) -> tuple[np.ndarray, np.ndarray]:
    """Class means [K, D] and the precision [D, D] of the shared covariance of labeled embeddings.

    Classes absent from ``labels`` get the overall mean (they cannot be measured; a run's
    training split holds every class, which convert checks). The covariance is pooled over the
    classes' centred embeddings and shrunk by ``shrinkage`` times its mean variance so the
    inverse exists even with fewer tiles than dimensions.

    Raises:
      ValueError: fewer than two labeled embeddings, or labels outside [0, num_classes).
    """
    x = np.asarray(embeddings, np.float64)
    y = np.asarray(labels)
    keep = y >= 0
    x, y = x[keep], y[keep]
    if len(x) < 2:
        raise ValueError(f"ood: need at least 2 labeled tiles to fit, got {len(x)}")
    if y.max() >= num_classes:
        raise ValueError(f"ood: label {y.max()} outside the {num_classes} classes")
    means = np.tile(x.mean(axis=0), (num_classes, 1))
    centred = np.empty_like(x)
    for k in range(num_classes):
        rows = y == k
        if rows.any():
            means[k] = x[rows].mean(axis=0)
            centred[rows] = x[rows] - means[k]
    cov = centred.T @ centred / len(x)
    cov += np.eye(len(cov)) * shrinkage * max(np.trace(cov) / len(cov), 1e-12)
    return means, np.linalg.inv(cov)


def mahalanobis_min(embeddings: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """min_k (x - mu_k)^T P (x - mu_k) for each row of [N, D] ``embeddings``, as [N] float64.

    Expanded as x'Px - 2 mu_k'Px + mu_k'P mu_k: one [N, D] x [D, D] product for all classes.
    """
    x = np.asarray(embeddings, np.float64)
    px = x @ precision
    quad_x = np.einsum("nd,nd->n", px, x)
    cross = px @ means.T  # P symmetric: mu' P x = (P x)' mu
    quad_mu = np.einsum("kd,de,ke->k", means, precision, means)
    return np.maximum(quad_x[:, None] - 2 * cross + quad_mu[None, :], 0.0).min(axis=1)


def calibrate(val_scores: np.ndarray, flag_fraction: float = FLAG_FRACTION) -> float:
    """The threshold that ``flag_fraction`` of ``val_scores`` exceed."""
    s = np.asarray(val_scores, np.float64)
    if s.size == 0 or not np.isfinite(s).all():
        raise ValueError(
            "ood: calibration needs finite validation scores, got "
            f"{s.size} scores ({int((~np.isfinite(s)).sum())} not finite)"
        )
    if not 0.0 < flag_fraction < 1.0:
        raise ValueError(f"ood: flag_fraction must be in (0, 1), got {flag_fraction}")
    # The round(f * n)-th largest score, exclusive: exactly that many tiles lie above (bar ties).
    return float(np.sort(s)[::-1][min(round(flag_fraction * s.size), s.size - 1)])


def fit(
    train_embeddings: np.ndarray,
    train_labels: np.ndarray,
    val_embeddings: np.ndarray,
    num_classes: int,
    flag_fraction: float = FLAG_FRACTION,
) -> OODStats:
    """Gaussians on the training embeddings, threshold calibrated on the validation ones."""
    means, precision = fit_gaussians(train_embeddings, train_labels, num_classes)
    threshold = calibrate(mahalanobis_min(val_embeddings, means, precision), flag_fraction)
    return OODStats(
        means,
        precision,
        threshold,
        flag_fraction,
        int((train_labels >= 0).sum()),
        len(val_embeddings),
    )


def flagged_fraction(flags: np.ndarray) -> float:
    """Fraction of a slide's tiles that are flagged (0 for a slide with no tiles)."""
    f = np.asarray(flags, bool)
    return float(f.mean()) if f.size else 0.0


def slide_fractions(slide_ids: np.ndarray, flagged: np.ndarray) -> dict[str, float]:
    """Flagged fraction of each slide's tiles, by slide id (in order of first appearance)."""
    ids = np.asarray(slide_ids).astype(str)
    f = np.asarray(flagged, bool)
    return {s: flagged_fraction(f[ids == s]) for s in dict.fromkeys(ids.tolist())}


def warning_lines(fractions: dict[str, float], warn_fraction: float) -> list[str]:
    """One line per slide whose flagged fraction is above ``warn_fraction``."""
    return [
        f"slide {s}: {100 * v:.0f}% of its tiles are out of the model's domain (above "
        f"{100 * warn_fraction:.0f}%): another site, stain, scanner or organ? Its predictions "
        "may be wrong; see the ood_score and ood_flag columns"
        for s, v in fractions.items()
        if v > warn_fraction
    ]
