"""How far a tile is from the training data: class-conditional Gaussians of the net's feature
statistics at several depths.

At the end of training a run measures, on its labeled training tiles, the statistics of a few of the
net's maps (:class:`OODTerm`): the channel mean and standard deviation of its normalised input
(colour) and of each stage's output but the last (texture), and the pooled last feature map (what
the classifier reads); a net that normalises stain also gets its input's colours as scanned, which
its normalisation takes away from every other term. Each gets one Gaussian per class with a shared
covariance; a tile's distance in each is its squared Mahalanobis distance to the nearest class mean,
as in Lee et al., "A simple unified framework for detecting out-of-distribution samples and
adversarial attacks" (NeurIPS 2018), who combine such layers' distances. Here each distance is
standardised by its mean and standard deviation on the validation tiles and the score is their
maximum: a tile unlike the training tiles at any depth is flagged. The threshold is the score that
``flag_fraction`` (5%) of the validation tiles exceed. A slide whose flagged fraction is above
``--ood_warn_fraction`` gets a warning.

Why several depths (issue 30, ``benchmarks/bench_ood_variants.py``): the x8 student's pooled last
map, read from 14 px tiles, barely moves for pink skin tissue (23% of the CMU slide's tiles
flagged, against 100% with the input's colour statistics among the terms). And a stain-normalised
x8 student's terms after its normalisation miss tissue of other organs whose colours it maps onto
the lung's (78-83% of the NCT and CMU tiles flagged); the colours as scanned flag all of them, and
also every tile of another lab's stain, which the normalisation may well handle: the flag then
says "unlike the training slides", not "the predictions are wrong" (BUILD_NOTES).

Runs trained before kept one term, the pooled last map, unstandardised; they load as such (said
once) and ``kd_histo.training.domain.refit_ood`` measures the new statistics without retraining.

The score costs, per term, one [B, D] x [D, D] product (D = 2 channels, or the last map's width):
small beside the net. Not here: where the maps come from (:mod:`kd_histo.models.ood_features`),
the file's place (the run folder, written by training).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np

from kd_histo import atomic

_LOG = logging.getLogger(__name__)
OOD_FILE = "ood.npz"
# ood.npz with terms (2); 3: a stain-normalised net also scores its input's colours as scanned.
# A file without "format" is the single pooled term of before (1).
FORMAT = 3
UNNORMALISED_FORMAT = 2  # format 3 changed the terms of stain-normalised nets only
FLAG_FRACTION = 0.05  # of the validation tiles above the threshold, by construction
WARN_FRACTION = 0.5  # a slide with more of its tiles flagged than this gets a warning
NO_STATS = (
    "this run has no out-of-domain statistics (trained without a val split, or before kd_histo "
    "measured them): no ood_score / ood_flag columns"
)
SINGLE_TERM = (
    "{path}: out-of-domain statistics of the pooled last feature map only (a run trained before "
    "the multi-depth score; it misses tissue of other sites that a low-resolution net's last map "
    "does not tell apart): refit them with python tools/refit_ood.py --model_dir={run_dir}"
)
NO_SCANNED_COLOURS = (
    "{path}: out-of-domain statistics without the colours as scanned (format {found}): this "
    "stain-normalised net then misses tissue whose colours its normalisation maps onto the "
    "training tiles' (other organs, other sites): refit them with python tools/refit_ood.py "
    "--model_dir={run_dir}"
)
SHRINKAGE = 1e-3  # ridge on the shared covariance, relative to its mean variance
MOMENTS = ("mean", "mean_sd")  # channel means only, or channel means then standard deviations
_SAID: set[str] = set()  # ood.npz files whose age was reported (once per process)


@dataclasses.dataclass(frozen=True)
class OODTerm:
    """One map's class-conditional Gaussians and how its distances are standardised.

    Attributes:
      layer: the net's layer whose output map is measured, or "features" (the net's last map).
      moments: "mean" (the channel means: the pooled map) or "mean_sd" (then the channel
        standard deviations), over the map's positions.
      means: [K, D] class means on the training tiles.
      precision: [D, D] inverse of the shared (tied, shrunk) covariance.
      center: mean of the validation tiles' distances (0 for a run's single old term).
      scale: their standard deviation (1 for a run's single old term).
    """

    layer: str
    moments: str
    means: np.ndarray
    precision: np.ndarray
    center: float = 0.0
    scale: float = 1.0

    def __post_init__(self):
        if self.moments not in MOMENTS:
            raise ValueError(f"ood: moments must be one of {MOMENTS}, got {self.moments!r}")
        k, d = np.shape(self.means)
        if np.shape(self.precision) != (d, d):
            raise ValueError(f"ood: precision must be [{d}, {d}], got {np.shape(self.precision)}")
        if not (np.isfinite(self.means).all() and np.isfinite(self.precision).all()):
            raise ValueError("ood: statistics are not finite")
        if not (np.isfinite(self.center) and np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"ood: standardisation {self.center}, {self.scale} is not usable")

    @property
    def dim(self) -> int:
        return int(np.shape(self.means)[1])

    def distances(self, x: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each [N, D] row to its nearest class mean."""
        return mahalanobis_min(x, self.means, self.precision)

    def standardised(self, x: np.ndarray) -> np.ndarray:
        return (self.distances(x) - self.center) / self.scale


@dataclasses.dataclass(frozen=True)
class OODStats:
    """A run's out-of-domain model: its terms and the calibrated threshold of their combination.

    A tile's features are its terms' statistics concatenated in term order ([N, sum of dims],
    :mod:`kd_histo.models.ood_features` measures them); its score is the maximum over the terms
    of the standardised distance.

    Attributes:
      terms: the measured maps, in order.
      threshold: score above which a tile is flagged.
      flag_fraction: the fraction of validation tiles above the threshold when it was calibrated.
      num_fit: training tiles the Gaussians were measured on.
      num_calibration: validation tiles the threshold was calibrated on.
      format: the ood.npz format the statistics were read from (:data:`FORMAT` when fitted).
    """

    terms: tuple[OODTerm, ...]
    threshold: float
    flag_fraction: float = FLAG_FRACTION
    num_fit: int = 0
    num_calibration: int = 0
    format: int = FORMAT

    def __post_init__(self):
        if not self.terms:
            raise ValueError("ood: no terms")
        if not np.isfinite(self.threshold):
            raise ValueError(f"ood: threshold {self.threshold} is not finite")

    @property
    def layers(self) -> tuple[tuple[str, str], ...]:
        """(layer, moments) of each term: what :mod:`kd_histo.models.ood_features` measures."""
        return tuple((t.layer, t.moments) for t in self.terms)

    @property
    def dim(self) -> int:
        return sum(t.dim for t in self.terms)

    def split(self, features: np.ndarray) -> list[np.ndarray]:
        """[N, dim] features -> each term's [N, D] part."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"ood: features must be [N, {self.dim}], got {list(x.shape)}")
        return np.split(x, np.cumsum([t.dim for t in self.terms])[:-1], axis=1)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Each tile's score: the largest standardised distance over the terms, [N] float64."""
        parts = self.split(features)
        return np.max([t.standardised(x) for t, x in zip(self.terms, parts)], axis=0)

    def flags(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, flagged) for [N, dim] features."""
        s = self.scores(features)
        return s, s > self.threshold

    def save(self, run_dir: str) -> str:
        path = os.path.join(run_dir, OOD_FILE)
        meta = {
            "format": FORMAT,
            **{
                k: getattr(self, k)
                for k in ("threshold", "flag_fraction", "num_fit", "num_calibration")
            },
            "terms": [
                {"layer": t.layer, "moments": t.moments, "center": t.center, "scale": t.scale}
                for t in self.terms
            ],
        }
        arrays = {}
        for i, t in enumerate(self.terms):
            arrays[f"means_{i}"], arrays[f"precision_{i}"] = t.means, t.precision
        with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, meta=json.dumps(meta), **arrays)
        return path

    @classmethod
    def load(cls, run_dir: str) -> OODStats | None:
        """The run's statistics, or None for a run trained before they existed. A run's single
        pooled term of before loads as such, said once per run and process."""
        path = os.path.join(run_dir, OOD_FILE)
        if not os.path.exists(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if "format" not in meta:  # before issue 30's refit: the pooled last map
                    term = OODTerm("features", "mean", z["means"], z["precision"])
                    if path not in _SAID:
                        _SAID.add(path)
                        _LOG.info(SINGLE_TERM.format(path=path, run_dir=run_dir))
                    return cls(terms=(term,), format=1, **meta)
                if meta["format"] > FORMAT:
                    raise ValueError(f"format newer than this kd_histo's ({FORMAT}); upgrade")
                terms = tuple(
                    OODTerm(means=z[f"means_{i}"], precision=z[f"precision_{i}"], **t)
                    for i, t in enumerate(meta.pop("terms"))
                )
                return cls(terms=terms, **meta)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path}: unreadable out-of-domain statistics ({e}); refit or retrain, or "
                "delete the file to predict without the flag"
            ) from None


def current_format(stain_normalised: bool) -> int:
    """The oldest ood.npz format whose score is this kd_histo's, for a net with or without a
    stain normalisation layer (format 3 added a term to those with one)."""
    return FORMAT if stain_normalised else UNNORMALISED_FORMAT


def load_for(run_dir: str, stain_normalised: bool) -> OODStats | None:
    """:meth:`OODStats.load`, saying once per run and process when a stain-normalised net's
    statistics predate the term of its colours as scanned (:func:`current_format`)."""
    stats = OODStats.load(run_dir)
    path = os.path.join(run_dir, OOD_FILE)
    old = stats is not None and 1 < stats.format < current_format(stain_normalised)
    if old and path not in _SAID:
        _SAID.add(path)
        _LOG.info(NO_SCANNED_COLOURS.format(path=path, found=stats.format, run_dir=run_dir))
    return stats


def file_format(run_dir: str) -> int | None:
    """The format of the run's ood.npz (1: the single pooled term of before the multi-depth
    score), None for a run without one.

    Raises:
      ValueError: an unreadable file (named).
    """
    path = os.path.join(run_dir, OOD_FILE)
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return int(json.loads(str(z["meta"])).get("format", 1))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable out-of-domain statistics ({e})") from None


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


def fit_term(
    layer: str,
    moments: str,
    train: np.ndarray,
    train_labels: np.ndarray,
    val: np.ndarray,
    num_classes: int,
) -> OODTerm:
    """One term: Gaussians on the training rows, standardised by the validation distances."""
    means, precision = fit_gaussians(train, train_labels, num_classes)
    d = mahalanobis_min(val, means, precision)
    return OODTerm(layer, moments, means, precision, float(d.mean()), float(max(d.std(), 1e-12)))


def fit(
    train_parts: list[np.ndarray],
    train_labels: np.ndarray,
    val_parts: list[np.ndarray],
    num_classes: int,
    layers: tuple[tuple[str, str], ...] = (("features", "mean"),),
    flag_fraction: float = FLAG_FRACTION,
) -> OODStats:
    """One term per (layer, moments) of ``layers`` from its part of the training and validation
    features ([N, D] each, in the same order), the threshold calibrated on the validation
    tiles' combined score."""
    if not len(train_parts) == len(val_parts) == len(layers):
        raise ValueError(
            f"ood: {len(layers)} layers, {len(train_parts)} training and {len(val_parts)} "
            "validation parts"
        )
    terms = tuple(
        fit_term(name, moments, x, train_labels, v, num_classes)
        for (name, moments), x, v in zip(layers, train_parts, val_parts)
    )
    unset = OODStats(terms, 0.0)
    threshold = calibrate(unset.scores(np.concatenate(val_parts, axis=1)), flag_fraction)
    return dataclasses.replace(
        unset,
        threshold=threshold,
        flag_fraction=flag_fraction,
        num_fit=int((np.asarray(train_labels) >= 0).sum()),
        num_calibration=len(val_parts[0]),
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
