"""Out-of-domain scores at evaluation: each tile's score from the same pass as its probabilities,
and metrics.json's summary of them (flagged fraction overall and per slide, warning lines).

Not here: the statistics and the score (``kd_histo.models.ood``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from kd_histo.models import ood


def probs_and_embedding(outputs: dict) -> tuple[tf.Tensor, tf.Tensor]:
    """A net's outputs -> (softmax probabilities [B, C], pooled last feature map [B, F]), both
    float32: what every scorer reads when it also measures the out-of-domain score."""
    pooled = tf.reduce_mean(tf.cast(outputs["features"], tf.float32), axis=[1, 2])
    return tf.nn.softmax(tf.cast(outputs["logits"], tf.float32)), pooled


def scores_in_graph(embedding: tf.Tensor, stats: ood.OODStats) -> tf.Tensor:
    """:meth:`kd_histo.models.ood.OODStats.scores` as TensorFlow ops (float32, [B]): min over
    classes of (x - mu_k)' P (x - mu_k), from the differences (no cancellation), so it runs in
    the same compiled graph as the net: scoring in NumPy batch by batch cost the x8 student 23-29%
    of its inference time on 112 px tiles (issue 30); in the graph it is within the noise."""
    means = tf.constant(stats.means, tf.float32)
    precision = tf.constant(stats.precision, tf.float32)
    diff = embedding[:, None, :] - means[None, :, :]  # [B, K, D]
    return tf.reduce_min(tf.einsum("bkd,de,bke->bk", diff, precision, diff), axis=1)


def probs_and_ood_function(model, stats: ood.OODStats, dtype: str = "float32"):
    """numpy batch -> (probabilities [B, C], out-of-domain scores [B]) in one pass of ``model``
    (the scores from its pooled last feature map, :mod:`kd_histo.models.ood`, computed in the
    same graph: :func:`scores_in_graph`)."""

    def both(x):
        x = tf.image.convert_image_dtype(x, tf.float32)
        probs, embedding = probs_and_embedding(model(x, training=False))
        return probs, scores_in_graph(embedding, stats)

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
