"""Out-of-domain scores at evaluation: each tile's score from the same pass as its probabilities,
and metrics.json's summary of them (flagged fraction overall and per slide, warning lines).

Not here: the statistics and the score (``kd_histo.models.ood``), the maps they read
(``kd_histo.models.ood_features``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tensorflow as tf

from kd_histo.models import ood, ood_features


def probs_and_ood_features(model, stats: ood.OODStats | None):
    """A function of float images [B, H, W, 3] in [0, 1], for use inside a ``tf.function``:
    (softmax probabilities [B, C], the features ``stats`` scores [B, D]), both float32, from one
    pass of ``model`` (:func:`kd_histo.models.ood_features.tapped`). Without statistics the
    features are the pooled last map (nothing reads them)."""
    if stats is None:  # any contract net (a cascade's ensemble teacher too): no tapping

        def plain(x):
            out = model(x, training=False)
            pooled = tf.reduce_mean(tf.cast(out["features"], tf.float32), axis=[1, 2])
            return tf.nn.softmax(tf.cast(out["logits"], tf.float32)), pooled

        return plain
    layers = stats.layers
    net = ood_features.tapped(model, layers)

    def call(x):
        out = net(x, training=False)
        probs = tf.nn.softmax(tf.cast(out["logits"], tf.float32))
        return probs, ood_features.features_in_graph(out["maps"], layers)

    return call


def _score_constants(stats: ood.OODStats):
    """Per term the Cholesky factor L (P = L L') and shift -c L of its centred whitening
    y = (x - c) L (c: the mean of its class means); over all columns the matrices that turn
    y into each term's |y|^2 / scale and into -2 y.m_k / scale (m_k = (mu_k - c) L), and the
    bias (|m_k|^2 - center) / scale, so the standardised distance to class k is
    |y|^2 / scale + (y @ cross + bias)_k: in float64, cast once."""
    terms = stats.terms
    k = len(terms[0].means)
    chol, shift = [], []
    member = np.zeros((stats.dim, len(terms)))  # [dim, T]
    cross = np.zeros((stats.dim, k, len(terms)))  # [dim, K, T]
    bias = np.zeros((k, len(terms)))
    start = 0
    for i, t in enumerate(terms):
        c = np.linalg.cholesky(t.precision)
        centre = t.means.mean(axis=0)
        m = (t.means - centre) @ c  # [K, D]: whitened class means about the centre
        chol.append(c)
        shift.append(-centre @ c)
        rows = slice(start, start + t.dim)
        member[rows, i] = 1.0 / t.scale
        cross[rows, :, i] = -2.0 * m.T / t.scale
        bias[:, i] = ((m * m).sum(axis=1) - t.center) / t.scale
        start += t.dim
    return chol, np.concatenate(shift), member, cross.reshape(stats.dim, -1), bias.reshape(-1)


def scores_in_graph(features: tf.Tensor, stats: ood.OODStats) -> tf.Tensor:
    """:meth:`kd_histo.models.ood.OODStats.scores` as TensorFlow ops (float32, [B]): per term,
    min over classes of the squared Mahalanobis distance |(x - mu_k) L|^2 (P = L L', Cholesky),
    standardised; the maximum over the terms.

    It runs in the same compiled graph as the net (scoring in NumPy batch by batch cost the x8
    student 23-29% of its inference time, issue 30). Each term is whitened by its own [D, D]
    product (one dense block-diagonal product of all terms was 3.4 times the multiply-adds, and
    at batch 256 most of the score's cost), about the centre of its class means, and the K
    distances come from |y|^2 - 2 y.m_k + |m_k|^2 as two thin products: no [B, K, dim] tensor.
    Centring keeps that expansion's float32 round-off at the level of the direct difference."""
    chol, shift, member, cross, bias = _score_constants(stats)
    dims = [t.dim for t in stats.terms]
    parts = tf.split(features, dims, axis=1) if len(dims) > 1 else [features]
    y = tf.concat([x @ tf.constant(c, tf.float32) for x, c in zip(parts, chol)], axis=1)
    y = y + tf.constant(shift, tf.float32)  # [B, dim], each term centred and whitened
    norms = tf.square(y) @ tf.constant(member, tf.float32)  # [B, T]
    to_means = y @ tf.constant(cross, tf.float32) + tf.constant(bias, tf.float32)  # [B, K * T]
    nearest = tf.reduce_min(tf.reshape(to_means, [-1, len(bias) // len(dims), len(dims)]), axis=1)
    return tf.reduce_max(norms + nearest, axis=1)


def probs_and_ood_function(model, stats: ood.OODStats, dtype: str = "float32"):
    """numpy batch -> (probabilities [B, C], out-of-domain scores [B]) in one pass of ``model``
    (the scores computed in the same graph: :func:`scores_in_graph`), traced once per tile size
    (any batch size): the maps' sizes are then constants of the graph, not ops."""
    probs_and_features = probs_and_ood_features(model, stats)

    def both(x):
        x = tf.image.convert_image_dtype(x, tf.float32)
        probs, features = probs_and_features(x)
        return probs, scores_in_graph(features, stats)

    traced = per_tile_size(both, dtype)

    def run(x):
        probs, scores = traced(x)
        return probs.numpy(), scores.numpy().astype(np.float64)

    return run


def per_tile_size(fn, dtype: str = "float32"):
    """``fn`` of a batch [B, H, W, 3] traced once per tile size (H, W), any batch size: the sizes
    of its maps are then constants of the graph, not ops. Measured on a Reinhard-normalised x8
    student at batch 64: 10% less CPU time than one trace for every size (``[None, None, None,
    3]``), whose per-image statistics then run as shape ops (BUILD_NOTES, issue 30)."""
    traced = {}

    def run(x):
        size = tuple(np.shape(x)[1:3])
        if size not in traced:
            spec = tf.TensorSpec([None, *size, 3], tf.as_dtype(dtype))
            traced[size] = tf.function(fn).get_concrete_function(spec)
        return traced[size](tf.convert_to_tensor(x))

    return run


def summary(
    slide_ids: np.ndarray, scores: np.ndarray, stats: ood.OODStats, warn_fraction: float
) -> dict[str, Any]:
    """metrics.json's "ood": the threshold, the flagged fraction of all tiles and of each slide,
    and the slides above ``warn_fraction`` with their warning lines."""
    flagged = scores > stats.threshold
    by_slide = ood.slide_fractions(slide_ids, flagged)
    return {
        "threshold": stats.threshold,
        "calibrated_flag_fraction": stats.flag_fraction,
        "flagged_fraction": ood.flagged_fraction(flagged),
        "slides_flagged_fraction": by_slide,
        "warn_fraction": warn_fraction,
        "warnings": ood.warning_lines(by_slide, warn_fraction),
    }


@dataclasses.dataclass(frozen=True)
class SplitFlags:
    """How much of one split of a run's data its out-of-domain score flags.

    Attributes:
      split: the split's name ("val": the threshold's calibration tiles).
      tiles: tiles read.
      flagged: the fraction above the run's threshold.
      groups: distinct slide / group ids (``slide_id``: an original image with ``--groups``).
      groups_mostly_flagged: those with more than half of their tiles flagged.
    """

    split: str
    tiles: int
    flagged: float
    groups: int
    groups_mostly_flagged: int


def flagged_by_split(model_dir: str, splits, data_dir: str = "") -> list[SplitFlags]:
    """The flagged share of each of ``splits`` of a run's data (default its own): whether the 5%
    calibrated on val holds on tiles the net never saw (test, and for a teacher, the unlabeled
    split), and how far the flags cluster by group.

    Raises:
      FileNotFoundError, ValueError: no such run, no ood.npz, or data it cannot read.
    """
    from kd_histo.data.pipeline import make_dataset
    from kd_histo.models import load_model
    from kd_histo.training.run_record import read_run_record

    run = read_run_record(model_dir)
    stats = ood.OODStats.load(model_dir)
    if stats is None:
        raise FileNotFoundError(
            f"{model_dir}: no {ood.OOD_FILE}; trained without a val split or before the score "
            "(python tools/refit_ood.py fits it)"
        )
    score = probs_and_ood_function(load_model(run.model_path(model_dir)), stats)
    pipe = dataclasses.replace(run.pipeline_config(data_dir or run.data_dir, 64), cache=False)
    out = []
    for split in splits:
        flags, ids = [], []
        for batch in make_dataset(pipe, split, training=False):
            flags.append(score(batch[run.view].numpy())[1] > stats.threshold)
            ids.append(batch["slide_id"].numpy())
        if not flags:
            raise ValueError(f"{model_dir}: the {split!r} split of its data has no tiles")
        flags, ids = np.concatenate(flags), np.concatenate(ids)
        groups = ood.slide_fractions(ids, flags)
        out.append(
            SplitFlags(
                split,
                len(flags),
                float(flags.mean()),
                len(groups),
                sum(v > 0.5 for v in groups.values()),
            )
        )
    return out
