"""The maps an out-of-domain score reads: which layers, their statistics against NumPy, and the
score in the net's graph equal to the NumPy score of the same statistics."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_histo.evaluation import ood_report
from kd_histo.models import build_model, ood, ood_features


def _net(**kw):
    return build_model(
        "resnet_gn", 3, mean=(0.5,) * 3, std=(0.2,) * 3, planes=(4, 8, 8, 16), stem="small", **kw
    )


def test_default_layers_are_the_input_the_early_stages_and_the_last_map():
    assert ood_features.default_layers(_net()) == (
        ("normalize", "mean_sd"),
        ("stage1_block1_out", "mean_sd"),
        ("stage2_block1_out", "mean_sd"),
        ("stage3_block1_out", "mean_sd"),
        ("features", "mean"),
    )
    deeper = ood_features.default_layers(_net(blocks=(1, 2, 1, 1)))
    assert ("stage2_block2_out", "mean_sd") in deeper
    assert ("stage2_block1_out", "mean_sd") not in deeper
    inputs = keras.Input((None, None, 3))
    feats = keras.layers.Conv2D(4, 1)(inputs)
    logits = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(feats))
    foreign = keras.Model(inputs, {"logits": logits, "features": feats})
    assert ood_features.default_layers(foreign) == (("features", "mean"),)
    with pytest.raises(ValueError, match="lacks: they were fitted on another net"):
        ood_features.tapped(foreign, (("stage1_block1_out", "mean_sd"),))


def test_statistics_in_the_graph_match_numpy_and_the_net_is_unchanged():
    net = _net()
    layers = ood_features.default_layers(net)
    x = np.random.default_rng(0).uniform(size=(5, 20, 20, 3)).astype(np.float32)
    logits, feats = ood_features.feature_function(net, layers)(x)
    maps = keras.Model(net.input, [net.get_layer(n).output for n, _ in layers[:-1]])(x)
    maps = [np.asarray(m) for m in maps] + [np.asarray(net(x)["features"])]
    np.testing.assert_allclose(feats, ood_features.moments_reference(maps, layers), atol=1e-5)
    np.testing.assert_allclose(logits, net(x)["logits"], atol=1e-6)
    assert feats.shape[1] == sum(ood_features.dims(net, layers)) == 2 * (3 + 4 + 8 + 8) + 16


def test_the_score_in_the_graph_equals_the_numpy_score_of_every_term():
    net = _net()
    layers = ood_features.default_layers(net)
    rng = np.random.default_rng(1)
    features_of = ood_features.feature_function(net, layers)
    x = rng.uniform(size=(60, 16, 16, 3)).astype(np.float32)
    y = np.repeat(np.arange(3), 20)
    _, train = features_of(x)
    _, val = features_of(rng.uniform(size=(30, 16, 16, 3)).astype(np.float32))
    cuts = np.cumsum(ood_features.dims(net, layers))[:-1]
    train, val = np.asarray(train, np.float64), np.asarray(val, np.float64)
    stats = ood.fit(np.split(train, cuts, 1), y, np.split(val, cuts, 1), 3, layers)
    queries = np.concatenate([x[:10], rng.uniform(0.6, 1.0, size=(10, 16, 16, 3))])
    queries = queries.astype(np.float32)
    probs, scores = ood_report.probs_and_ood_function(net, stats)(queries)
    _, f = features_of(queries)
    want = stats.scores(np.asarray(f, np.float64))
    np.testing.assert_allclose(scores, want, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(probs, tf.nn.softmax(net(queries)["logits"]), atol=1e-5)


def test_the_per_term_graph_of_wide_nets_equals_the_fused_one(monkeypatch):
    rng = np.random.default_rng(2)
    parts = [rng.normal(size=(90, d)) * rng.uniform(0.5, 2, d) for d in (6, 8, 5)]
    val = [rng.normal(size=(40, d)) for d in (6, 8, 5)]
    layers = (("normalize", "mean_sd"), ("stage1_block1_out", "mean_sd"), ("features", "mean"))
    stats = ood.fit(parts, np.repeat(np.arange(3), 30), val, 3, layers)
    q = np.concatenate([rng.normal(0, 3, size=(12, d)) for d in (6, 8, 5)], axis=1)
    fused = ood_report.scores_in_graph(tf.constant(q, tf.float32), stats).numpy()
    monkeypatch.setattr(ood_report, "FUSED_DIM", 0)
    per_term = ood_report.scores_in_graph(tf.constant(q, tf.float32), stats).numpy()
    np.testing.assert_allclose(fused, stats.scores(q), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(per_term, stats.scores(q), rtol=1e-3, atol=1e-3)
