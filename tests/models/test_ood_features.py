"""The maps an out-of-domain score reads: which layers, their statistics against NumPy, and the
score in the net's graph equal to the NumPy score of the same statistics."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_histo.evaluation import ood_report
from kd_histo.models import build_model, ood, ood_features


def _net(planes=(4, 8, 8, 16), **kw):
    return build_model(
        "resnet_gn", 3, mean=(0.5,) * 3, std=(0.2,) * 3, planes=planes, stem="small", **kw
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


def _previous_features(maps, layers):
    """features_in_graph before issue 30's cost work: tf.nn.moments per map."""
    parts = []
    for f, (_, moments) in zip(maps, layers):
        mean, var = tf.nn.moments(tf.cast(f, tf.float32), axes=[1, 2])
        parts.append(mean)
        if moments == "mean_sd":
            parts.append(tf.sqrt(tf.maximum(var, 0.0)))
    return tf.concat(parts, axis=1)


def _previous_scores(features, stats):
    """scores_in_graph before issue 30's cost work: one block-diagonal whitening of all terms,
    the [B, K, dim] differences to the whitened class means."""
    terms = stats.terms
    chol = [np.linalg.cholesky(t.precision) for t in terms]
    whiten = np.zeros((stats.dim, stats.dim))
    means = np.concatenate([t.means @ c for t, c in zip(terms, chol)], axis=1)
    member = np.zeros((stats.dim, len(terms)))
    start = 0
    for i, (t, c) in enumerate(zip(terms, chol)):
        whiten[start : start + t.dim, start : start + t.dim] = c
        member[start : start + t.dim, i] = 1.0
        start += t.dim
    y = features @ tf.constant(whiten, tf.float32)
    sq = tf.square(y[:, None, :] - tf.constant(means, tf.float32)[None])
    d = tf.reduce_min(tf.einsum("bkd,dt->bkt", sq, tf.constant(member, tf.float32)), axis=1)
    center = tf.constant([t.center for t in terms], tf.float32)
    scale = tf.constant([t.scale for t in terms], tf.float32)
    return tf.reduce_max((d - center) / scale, axis=1)


def test_the_scores_equal_those_of_the_previous_graph():
    net = _net(planes=(16, 32, 64, 128))
    layers = ood_features.default_layers(net)
    rng = np.random.default_rng(3)
    tapped = ood_features.tapped(net, layers)  # the last map comes pooled by the net's own layer
    unpooled = keras.Model(
        net.input, [net.get_layer(n).output for n, _ in layers[:-1]] + [net.output["features"]]
    )
    x = rng.uniform(size=(90, 14, 14, 3)).astype(np.float32)
    before = _previous_features(unpooled(x), layers)
    np.testing.assert_allclose(
        ood_features.features_in_graph(tapped(x)["maps"], layers), before, atol=2e-5
    )
    f = np.asarray(before, np.float64)
    cuts = np.cumsum(ood_features.dims(net, layers))[:-1]
    stats = ood.fit(np.split(f[:60], cuts, 1), np.repeat(np.arange(3), 20),
                    np.split(f[60:], cuts, 1), 3, layers)  # fmt: skip
    q = np.concatenate([x[:20], rng.uniform(0.7, 1.0, size=(10, 14, 14, 3))]).astype(np.float32)
    want = _previous_scores(_previous_features(unpooled(q), layers), stats).numpy()
    got = ood_report.scores_in_graph(
        ood_features.features_in_graph(tapped(q)["maps"], layers), stats
    )
    assert want.min() < stats.threshold < want.max()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got.numpy() > stats.threshold, want > stats.threshold)


def test_a_near_constant_map_keeps_its_standard_deviation_within_5_percent():
    rng = np.random.default_rng(4)
    maps = [(3.0 + 0.01 * rng.normal(size=(4, 14, 14, 3))).astype(np.float32)]
    layers = (("normalize", "mean_sd"),)
    got = np.asarray(ood_features.features_in_graph(maps, layers))
    want = ood_features.moments_reference(maps, layers)
    np.testing.assert_allclose(got[:, :3], want[:, :3], rtol=1e-6)
    # E[x^2] - E[x]^2 in float32: a channel whose mean is 300 times its spread keeps its sd
    # within 5% (3% here; tf.nn.moments' two passes kept 1e-5)
    np.testing.assert_allclose(got[:, 3:], want[:, 3:], rtol=5e-2)


def test_wide_terms_score_as_in_numpy():
    rng = np.random.default_rng(2)
    widths = (6, 300, 2100)
    parts = [rng.normal(size=(90, d)) * rng.uniform(0.5, 2, d) + 5 for d in widths]
    val = [rng.normal(size=(40, d)) + 5 for d in widths]
    layers = (("normalize", "mean_sd"), ("stage1_block1_out", "mean_sd"), ("features", "mean"))
    stats = ood.fit(parts, np.repeat(np.arange(3), 30), val, 3, layers)
    q = np.concatenate([rng.normal(5, 3, size=(12, d)) for d in widths], axis=1)
    got = ood_report.scores_in_graph(tf.constant(q, tf.float32), stats).numpy()
    np.testing.assert_allclose(got, stats.scores(q), rtol=1e-3, atol=1e-3)


def _tissue(rng, n, tint=(0.0, 0.0, 0.0)):
    """[n, 16, 16, 3] pink-purple tissue-like tiles in [0, 1], plus an RGB offset (another lab)."""
    base = np.array([0.75, 0.45, 0.65]) + np.asarray(tint)
    x = base + rng.normal(0, 0.12, size=(n, 16, 16, 1)) * np.array([0.8, 1.0, 0.6])
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def test_a_stain_normalised_net_also_scores_the_colours_as_scanned():
    from kd_histo.data.stain_norm import fit_reference

    rng = np.random.default_rng(3)
    train = _tissue(rng, 60)
    net = _net(stain_reference=fit_reference("reinhard", list(train), source="synthetic"))
    layers = ood_features.default_layers(net)
    assert layers[:2] == (("image", "mean_sd"), ("normalize", "mean_sd"))
    features_of = ood_features.feature_function(net, layers)
    x = _tissue(rng, 5, tint=(-0.2, 0.05, 0.1))
    _, feats = features_of(x)
    want = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)
    np.testing.assert_allclose(np.asarray(feats)[:, :6], want, atol=1e-5)  # before the stain layer

    cuts = np.cumsum(ood_features.dims(net, layers))[:-1]
    y = np.repeat(np.arange(3), 20)
    _, f_train = features_of(train)
    _, f_val = features_of(_tissue(rng, 40))
    parts = [np.split(np.asarray(f, np.float64), cuts, 1) for f in (f_train, f_val)]
    stats = ood.fit(parts[0], y, parts[1], 3, layers)
    _, f_held = features_of(_tissue(rng, 40))
    _, f_lab = features_of(_tissue(rng, 40, tint=(-0.2, 0.05, 0.1)))
    _, held = stats.flags(np.asarray(f_held, np.float64))
    _, other_lab = stats.flags(np.asarray(f_lab, np.float64))
    assert held.mean() <= 0.2 and other_lab.mean() >= 0.9
    # The other lab's colours are what the stain layer takes away: the scanned term flags them.
    scanned = stats.terms[0].standardised(stats.split(np.asarray(f_lab, np.float64))[0])
    assert (scanned > stats.threshold).mean() >= 0.9
