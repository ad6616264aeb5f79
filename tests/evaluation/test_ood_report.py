"""The out-of-domain score inside the net's graph equals the NumPy score of kd_histo.models.ood."""

import numpy as np
import tensorflow as tf

from kd_histo.evaluation import ood_report
from kd_histo.models import ood


def _stats(rng, d=16, k=3):
    x = rng.normal(size=(200, d)) * rng.uniform(0.5, 3.0, size=d) + 4.0
    y = rng.integers(0, k, size=200)
    return ood.fit([x], y, [rng.normal(size=(50, d)) + 4.0], k)


def test_scores_in_graph_match_the_numpy_scores():
    rng = np.random.default_rng(0)
    stats = _stats(rng)
    emb = np.concatenate([rng.normal(size=(40, 16)) + 4.0, rng.normal(size=(8, 16)) * 5 + 9])
    got = ood_report.scores_in_graph(tf.constant(emb, tf.float32), stats).numpy()
    want = stats.scores(emb)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    assert (want > stats.threshold).any() and (want <= stats.threshold).any()
    np.testing.assert_array_equal(got > stats.threshold, want > stats.threshold)


def test_probs_and_ood_function_scores_the_pooled_features():
    rng = np.random.default_rng(1)
    stats = _stats(rng, d=4, k=2)
    inputs = tf.keras.Input((None, None, 3))
    feats = tf.keras.layers.Conv2D(4, 1, kernel_initializer="ones")(inputs)
    logits = tf.keras.layers.Dense(2)(tf.keras.layers.GlobalAveragePooling2D()(feats))
    model = tf.keras.Model(inputs, {"logits": logits, "features": feats})
    x = rng.uniform(size=(5, 6, 6, 3)).astype(np.float32) * 4
    probs, scores = ood_report.probs_and_ood_function(model, stats)(x)
    pooled = np.asarray(model(x)["features"]).mean(axis=(1, 2))
    assert probs.shape == (5, 2) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, stats.scores(pooled), rtol=1e-4, atol=1e-3)


def test_plain_and_scored_functions_trace_once_per_tile_size_with_static_sizes():
    from kd_histo.evaluation import evaluate

    inputs = tf.keras.Input((None, None, 3))
    logits = tf.keras.layers.Dense(2)(tf.keras.layers.GlobalAveragePooling2D()(inputs))
    model = tf.keras.Model(inputs, logits)
    shapes = []

    def record(x):
        shapes.append(tuple(x.shape))  # runs when traced, not when called
        return model(x)

    fn = ood_report.per_tile_size(record)
    rng = np.random.default_rng(2)
    for b, px in ((3, 8), (5, 8), (2, 6), (4, 6)):
        x = rng.uniform(size=(b, px, px, 3)).astype(np.float32)
        np.testing.assert_allclose(fn(x).numpy(), model(x).numpy(), rtol=1e-5)
    assert shapes == [(None, 8, 8, 3), (None, 6, 6, 3)]  # sizes static, any batch
    x8 = (rng.uniform(size=(3, 8, 8, 3)) * 255).astype(np.uint8)
    probs = evaluate.probs_function(model, "uint8")(x8)
    want = tf.nn.softmax(model(x8.astype(np.float32) / 255.0)).numpy()
    np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)
