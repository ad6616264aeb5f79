"""Out-of-domain scores at evaluation: each tile's score from the same pass as its probabilities,
and metrics.json's summary of them (flagged fraction overall and per slide, warning lines).

Not here: the statistics and the score (``kd_histo.models.ood``), the maps they read
(``kd_histo.models.ood_features``).
"""

from __future__ import annotations

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


FUSED_DIM = 2048  # terms this wide in all are whitened by one block-diagonal product


def scores_in_graph(features: tf.Tensor, stats: ood.OODStats) -> tf.Tensor:
    """:meth:`kd_histo.models.ood.OODStats.scores` as TensorFlow ops (float32, [B]): per term,
    min over classes of |L'(x - mu_k)|^2 (P = L L', Cholesky), standardised; the maximum over
    the terms. It runs in the same compiled graph as the net (scoring in NumPy batch by batch
    cost the x8 student 23-29% of its inference time, issue 30), and up to :data:`FUSED_DIM`
    the terms share one whitening product and one reduction: a few ops whatever their number
    (one small op chain per term cost the x8 student 10% of its time)."""
    terms = stats.terms
    chol = [np.linalg.cholesky(t.precision) for t in terms]
    if stats.dim > FUSED_DIM:
        parts = tf.split(features, [t.dim for t in terms], axis=1)
        scores = []
        for t, c, x in zip(terms, chol, parts):
            y = x @ tf.constant(c, tf.float32)  # [B, D]
            diff = y[:, None, :] - tf.constant(t.means @ c, tf.float32)[None]
            d = tf.reduce_min(tf.reduce_sum(tf.square(diff), axis=2), axis=1)
            scores.append((d - t.center) / t.scale)
        return tf.reduce_max(tf.stack(scores, axis=1), axis=1)
    whiten = np.zeros((stats.dim, stats.dim))
    means = np.concatenate([t.means @ c for t, c in zip(terms, chol)], axis=1)  # [K, dim]
    member = np.zeros((stats.dim, len(terms)))  # which term each column belongs to
    start = 0
    for i, (t, c) in enumerate(zip(terms, chol)):
        whiten[start : start + t.dim, start : start + t.dim] = c
        member[start : start + t.dim, i] = 1.0
        start += t.dim
    y = features @ tf.constant(whiten, tf.float32)  # [B, dim]
    sq = tf.square(y[:, None, :] - tf.constant(means, tf.float32)[None])  # [B, K, dim]
    d = tf.reduce_min(tf.einsum("bkd,dt->bkt", sq, tf.constant(member, tf.float32)), axis=1)
    center = tf.constant([t.center for t in terms], tf.float32)
    scale = tf.constant([t.scale for t in terms], tf.float32)
    return tf.reduce_max((d - center) / scale, axis=1)


def probs_and_ood_function(model, stats: ood.OODStats, dtype: str = "float32"):
    """numpy batch -> (probabilities [B, C], out-of-domain scores [B]) in one pass of ``model``
    (the scores computed in the same graph: :func:`scores_in_graph`)."""
    probs_and_features = probs_and_ood_features(model, stats)

    def both(x):
        x = tf.image.convert_image_dtype(x, tf.float32)
        probs, features = probs_and_features(x)
        return probs, scores_in_graph(features, stats)

    fn = tf.function(both).get_concrete_function(
        tf.TensorSpec([None, None, None, 3], tf.as_dtype(dtype))
    )

    def run(x):
        probs, scores = fn(tf.convert_to_tensor(x))
        return probs.numpy(), scores.numpy().astype(np.float64)

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
