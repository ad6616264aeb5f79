"""kd_histo.training.losses against NumPy references and invariants (eager, tf.function and XLA)."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_histo.training import losses as L
from kd_histo.training import map_resize as MR


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_kd(zt, zs, T):
    pt, ps = _softmax(zt / T), _softmax(zs / T)
    return float(np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1)) * T * T)


def np_adaptive_max(x, h, w):
    B, H, W, C = x.shape
    out = np.zeros((B, h, w, C), x.dtype)
    for i in range(h):
        r0, r1 = math.floor(i * H / h), math.ceil((i + 1) * H / h)
        for j in range(w):
            c0, c1 = math.floor(j * W / w), math.ceil((j + 1) * W / w)
            out[:, i, j] = x[:, r0:r1, c0:c1].max(axis=(1, 2))
    return out


def np_cubic(t, a):
    t = abs(t)
    if t <= 1:
        return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0


def np_bicubic_torch(x, h, w):
    """Port of PyTorch's upsample_bicubic2d (align_corners=False): a=-0.75, clamped taps."""
    B, H, W, C = x.shape
    out = np.zeros((B, h, w, C), np.float64)

    def taps(o, n_in, n_out):
        src = (o + 0.5) * (n_in / n_out) - 0.5
        i0 = math.floor(src)
        t = src - i0
        return [(min(max(i0 + d, 0), n_in - 1), np_cubic(t - d, -0.75)) for d in (-1, 0, 1, 2)]

    for i in range(h):
        for j in range(w):
            for r, wr in taps(i, H, h):
                for c, wc in taps(j, W, w):
                    out[:, i, j] += wr * wc * x[:, r, c]
    return out


def test_kd_zero_when_equal_and_matches_numpy():
    rng = np.random.default_rng(0)  # per test: same data under pytest-xdist
    zt = rng.normal(size=(5, 4)).astype("f4") * 3
    zs = rng.normal(size=(5, 4)).astype("f4") * 3
    assert abs(float(L.kd_kl(zt, zt, 4.0))) < 1e-6
    np.testing.assert_allclose(float(L.kd_kl(zt, zs, 4.0)), np_kd(zt, zs, 4.0), rtol=1e-5)
    assert float(L.kd_kl(zt, zs, 4.0)) > 0


def test_kd_t_squared_factor():
    rng = np.random.default_rng(0)  # per test: same data under pytest-xdist
    zt, zs = rng.normal(size=(3, 6)).astype("f4"), rng.normal(size=(3, 6)).astype("f4")
    for T in (1.0, 2.0, 8.0):
        np.testing.assert_allclose(
            float(L.kd_kl(zt, zs, T)), T * T * float(L.kd_kl(zt / T, zs / T, 1.0)), rtol=1e-5
        )


def test_kd_large_logits_finite_and_float32():
    zt = tf.constant([[1e4, -1e4, 0.0]], tf.float16)
    zs = tf.constant([[-1e4, 1e4, 0.0]], tf.float16)
    v = L.kd_kl(zt, zs, 1.0)
    assert v.dtype == tf.float32 and np.isfinite(v.numpy()) and v.numpy() > 0
    with pytest.raises(ValueError, match="temperature"):
        L.kd_kl(zt, zs, 0.0)


@pytest.mark.parametrize(
    "in_hw,out_hw",
    [((8, 8), (4, 4)), ((7, 7), (2, 2)), ((7, 5), (3, 4)), ((5, 9), (5, 9)), ((3, 3), (5, 5))],
)
def test_adaptive_max_pool_matches_pytorch_bins(in_hw, out_hw):
    rng = np.random.default_rng(0)  # per test: same data under pytest-xdist
    x = rng.normal(size=(2, *in_hw, 3)).astype("f4")
    np.testing.assert_array_equal(
        MR.adaptive_max_pool2d(x, out_hw).numpy(), np_adaptive_max(x, *out_hw)
    )


def test_adaptive_max_pool_equals_max_pool_for_multiples():
    rng = np.random.default_rng(0)  # per test: same data under pytest-xdist
    x = rng.normal(size=(2, 8, 12, 3)).astype("f4")
    ref = tf.nn.max_pool2d(x, (2, 3), (2, 3), "VALID").numpy()
    np.testing.assert_array_equal(MR.adaptive_max_pool2d(x, (4, 4)).numpy(), ref)


@pytest.mark.parametrize(
    "in_hw,out_hw",
    [((7, 7), (4, 4)), ((8, 8), (4, 4)), ((7, 9), (3, 5)), ((4, 4), (7, 9)), ((1, 1), (3, 3))],
)
def test_bicubic_torch_matches_numpy_port(in_hw, out_hw):
    rng = np.random.default_rng(0)  # per test: same data under pytest-xdist
    x = rng.normal(size=(2, *in_hw, 3)).astype("f4")
    np.testing.assert_allclose(
        MR.bicubic_resize(x, out_hw, "torch").numpy(), np_bicubic_torch(x, *out_hw), atol=1e-5
    )


@pytest.mark.parametrize(
    "in_hw,out_hw", [((7, 7), (4, 4)), ((8, 8), (4, 4)), ((7, 9), (3, 5)), ((4, 4), (14, 18))]
)
def test_bicubic_tf_style_matches_tf_image_resize(in_hw, out_hw):
    rng = np.random.default_rng(0)  # per test: same data under pytest-xdist
    x = rng.random((2, *in_hw, 3), dtype=np.float32)
    # TF's kernel reads its weights from a 1024-entry table, hence ~1e-4 differences.
    np.testing.assert_allclose(
        MR.bicubic_resize(x, out_hw, "tf").numpy(),
        tf.image.resize(x, out_hw, "bicubic").numpy(),
        atol=2e-3,
    )


def test_torch_and_tf_kernels_differ():
    rng = np.random.default_rng(0)  # per test: same data under pytest-xdist
    x = rng.normal(size=(1, 7, 7, 1)).astype("f4")
    diff = np.abs(
        MR.bicubic_resize(x, (4, 4), "torch").numpy() - MR.bicubic_resize(x, (4, 4), "tf").numpy()
    )
    assert diff.max() > 1e-3


@pytest.mark.parametrize("mode", L.FEATURE_MODES)
def test_resize_of_constant_map_is_constant(mode):
    x = np.full((2, 7, 9, 4), 2.5, "f4")
    np.testing.assert_allclose(
        L.resize_teacher_map(x, (3, 4), mode).numpy(), np.full((2, 3, 4, 4), 2.5), atol=1e-5
    )


def test_feature_map_loss_matches_numpy():
    rng = np.random.default_rng(0)  # per test: same data under pytest-xdist
    s = rng.normal(size=(2, 3, 3, 4)).astype("f4")
    t = rng.normal(size=(2, 7, 7, 4)).astype("f4")
    mp, bc = np_adaptive_max(t, 3, 3), np_bicubic_torch(t, 3, 3)
    both = 0.5 * (mp + bc)
    np.testing.assert_allclose(
        float(L.feature_map_loss(s, t, "maxpool", "l2")), np.mean((s - mp) ** 2), rtol=1e-5
    )
    np.testing.assert_allclose(
        float(L.feature_map_loss(s, t, "bicubic", "l1")), np.mean(np.abs(s - bc)), rtol=1e-5
    )
    np.testing.assert_allclose(
        float(L.feature_map_loss(s, t, "maxpool+bicubic", "l2")),
        np.mean((s - both) ** 2),
        rtol=1e-5,
    )
    assert abs(float(L.feature_map_loss(mp, t, "maxpool", "l1"))) < 1e-7


def test_feature_map_loss_errors():
    s, t = np.zeros((1, 2, 2, 4), "f4"), np.zeros((1, 4, 4, 8), "f4")
    with pytest.raises(ValueError, match="channels: student 4, teacher 8"):
        L.feature_map_loss(s, t)
    with pytest.raises(ValueError, match="feature mode"):
        L.feature_map_loss(s, s, mode="avg")
    with pytest.raises(ValueError, match="feature norm"):
        L.feature_map_loss(s, s, norm="l3")


def test_masked_ce():
    rng = np.random.default_rng(0)  # per test: same data under pytest-xdist
    logits = rng.normal(size=(4, 3)).astype("f4")
    labels = np.array([2, -1, 0, -1])
    p = _softmax(logits.astype("f8"))
    ref = -np.mean([np.log(p[0, 2]), np.log(p[2, 0])])
    np.testing.assert_allclose(float(L.masked_ce(labels, logits)), ref, rtol=1e-5)
    assert float(L.masked_ce(np.full(4, -1), logits)) == 0.0
    # unlabeled rows carry no gradient
    lt = tf.Variable(logits)
    with tf.GradientTape() as tape:
        loss = L.masked_ce(labels, lt)
    g = tape.gradient(loss, lt).numpy()
    assert np.all(g[[1, 3]] == 0) and np.any(g[[0, 2]] != 0)


def test_info_nce_matches_numpy_and_prefers_aligned_pairs():
    rng = np.random.default_rng(0)  # per test: same data under pytest-xdist
    s = rng.normal(size=(6, 5)).astype("f4")
    t = rng.normal(size=(6, 5)).astype("f4")
    sn = s / np.linalg.norm(s, axis=1, keepdims=True)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    sim = sn @ tn.T / 0.1
    ref = np.mean(-np.log(_softmax(sim.astype("f8"))[np.arange(6), np.arange(6)]))
    np.testing.assert_allclose(float(L.info_nce(s, t, 0.1)), ref, rtol=1e-4)
    aligned = float(L.info_nce(s, s * 3.0, 0.1))
    assert aligned < float(L.info_nce(s, t, 0.1)) and aligned < 0.5


def test_attention_transfer():
    rng = np.random.default_rng(0)  # per test: same data under pytest-xdist
    s = rng.normal(size=(2, 3, 3, 4)).astype("f4")
    t = rng.normal(size=(2, 6, 6, 8)).astype("f4")
    tp = np_adaptive_max(t, 3, 3)

    def att(m):
        a = np.mean(np.abs(m) ** 2, -1).reshape(len(m), -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    np.testing.assert_allclose(
        float(L.attention_transfer(s, t)), np.mean((att(s) - att(tp)) ** 2), rtol=1e-5
    )
    assert abs(float(L.attention_transfer(s, s))) < 1e-9


def test_keras_distillation_wrappers_equal_pure_functions():
    rng = np.random.default_rng(0)  # per test: same data under pytest-xdist
    t = {
        "logits": rng.normal(size=(2, 3)).astype("f4"),
        "features": rng.normal(size=(2, 6, 6, 4)).astype("f4"),
    }
    s = {
        "logits": rng.normal(size=(2, 3)).astype("f4"),
        "features": rng.normal(size=(2, 3, 3, 4)).astype("f4"),
    }
    assert float(L.LogitsKD(2.0).compute_loss(t, s)) == float(
        L.kd_kl(t["logits"], s["logits"], 2.0)
    )
    assert float(L.FeatureMapKD("bicubic", "l1").compute_loss(t, s)) == float(
        L.feature_map_loss(s["features"], t["features"], "bicubic", "l1")
    )
    bad = {"logits": np.zeros((2, 5), "f4"), "features": np.zeros((2, 3, 3, 4), "f4")}
    with pytest.raises(ValueError, match="classes"):
        L.LogitsKD().validate_outputs(t, bad)
    labels = np.array([1, -1])
    assert float(L.MaskedCE().compute_loss(t, s, batch={"label": labels})) == float(
        L.masked_ce(labels, s["logits"])
    )
    assert float(L.AttentionTransfer().compute_loss(t, s)) == float(
        L.attention_transfer(s["features"], t["features"])
    )


def test_graph_xla_and_dynamic_shapes_agree_with_eager():
    rng = np.random.default_rng(0)  # per test: same data under pytest-xdist
    s = rng.normal(size=(2, 3, 3, 4)).astype("f4")
    t = rng.normal(size=(2, 7, 7, 4)).astype("f4")
    eager = float(L.feature_map_loss(s, t))
    dynamic = tf.function(
        L.feature_map_loss, input_signature=[tf.TensorSpec([None, None, None, 4])] * 2
    )
    np.testing.assert_allclose(float(dynamic(s, t)), eager, rtol=1e-6)
    xla = tf.function(lambda a, b: L.feature_map_loss(a, b), jit_compile=True)
    np.testing.assert_allclose(float(xla(s, t)), eager, rtol=1e-5)


@pytest.mark.parametrize("mode", L.FEATURE_MODES)
@pytest.mark.parametrize("style", L.BICUBIC_STYLES)
def test_resizing_a_map_to_its_own_size_is_the_identity(mode, style):
    # what lets the teacher cache store FeatureMapKD.target and the loss use it as is
    x = np.random.default_rng(0).normal(size=(2, 5, 3, 4)).astype("f4")
    np.testing.assert_allclose(L.resize_teacher_map(x, (5, 3), mode, style).numpy(), x, atol=1e-6)


def test_loss_objects_check_their_parameters_and_round_trip_their_config():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        L.LogitsKD(0.0)
    with pytest.raises(ValueError, match="ssl temperature must be > 0"):
        L.InfoNCE(-1.0)
    with pytest.raises(ValueError, match="feature mode"):
        L.FeatureMapKD("avg")
    with pytest.raises(ValueError, match="feature norm"):
        L.FeatureMapKD(norm="l3")
    with pytest.raises(ValueError, match="bicubic style"):
        L.FeatureMapKD(bicubic_style="lanczos")
    for loss in (
        L.LogitsKD(2.0),
        L.FeatureMapKD("bicubic", "l1", "tf"),
        L.MaskedCE(),
        L.InfoNCE(0.2, 16),
        L.AttentionTransfer(3.0),
    ):
        again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
        assert type(again) is type(loss) and again.get_config() == loss.get_config()
