"""The nets' Conv2D and Normalization layers (kd_histo.models.resnet_gn / .normalize): each equals
the Keras layer it replaces, forward and backward, and takes its fast path where it should."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_histo.models import build_model
from kd_histo.models.normalize import Normalization
from kd_histo.models.resnet_gn import Conv2D, GroupNormalization

MEAN, STD = [0.7, 0.5, 0.7], [0.15, 0.2, 0.15]

# (input shape, filters, kernel, stride, padding, whether the matmul path applies)
CASES = [
    ((3, 1, 1, 16), 8, 3, 1, "same", True),  # stage 4's conv2 of an 8x student: centre tap
    ((3, 1, 1, 16), 8, 3, 2, "same", True),
    ((3, 4, 4, 16), 8, 3, 2, "valid", True),  # stage 4's conv1 on the zero-padded 2x2 map
    ((2, 3, 5, 4), 6, 3, 1, "valid", False),  # 1x3 outputs: oneDNN
    ((2, 3, 3, 4), 6, 3, 1, "valid", True),
    ((3, 2, 2, 16), 8, 1, 1, "valid", True),  # projection convs on tiny maps
    ((3, 1, 1, 16), 8, 1, 1, "valid", True),
    ((2, 4, 4, 8), 8, 1, 1, "valid", False),  # 16 pixels: oneDNN
    ((2, 2, 2, 8), 8, 3, 1, "same", False),
    ((2, 7, 7, 8), 8, 3, 2, "valid", False),
]


def _graph(layer, shape, dtype):
    return tf.function(layer).get_concrete_function(tf.TensorSpec(shape, dtype)).graph


def _graph_ops(layer, shape, dtype):
    return {op.type for op in _graph(layer, shape, dtype).get_operations()}


def _keras_class(layer):
    """The Keras class a kd_histo twin layer replaces (other layers: their own class)."""
    twins = (Conv2D, GroupNormalization, Normalization)
    return type(layer).__mro__[1] if type(layer) in twins else type(layer)


def _image_divides(layer, shape):
    """Divides and subtracts in the layer's graph that read a tensor larger than a row of 48."""
    ops = _graph(layer, shape, tf.float32).get_operations()

    def big(t):
        return t.shape.num_elements() is None or t.shape.num_elements() > 48

    return [op.name for op in ops if op.type in ("RealDiv", "Sub") and any(map(big, op.inputs))]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape, filters, kernel, stride, padding, fast", CASES)
def test_conv_equals_keras_conv(shape, filters, kernel, stride, padding, fast, dtype):
    kw = dict(strides=stride, padding=padding, use_bias=True, dtype=dtype)
    ours, ref = Conv2D(filters, kernel, **kw), keras.layers.Conv2D(filters, kernel, **kw)
    ours.build(shape)
    ref.build(shape)
    rng = np.random.default_rng(sum(shape) + kernel)
    for a, b in ((ours.kernel, ref.kernel), (ours.bias, ref.bias)):
        v = rng.standard_normal(a.shape).astype(np.float32)
        a.assign(v)
        b.assign(v)
    x = tf.constant(rng.standard_normal(shape).astype(dtype))
    w = tf.constant(rng.standard_normal(ref.compute_output_shape(shape)).astype(dtype))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y_ours, y_ref = ours(x), ref(x)
        l_ours = tf.reduce_sum(tf.cast(w * y_ours, tf.float32))
        l_ref = tf.reduce_sum(tf.cast(w * y_ref, tf.float32))
    assert y_ours.shape == y_ref.shape and y_ours.dtype == y_ref.dtype
    tol = 1e-5 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(y_ours.numpy(), y_ref.numpy(), rtol=tol, atol=tol * 10)
    grads = zip(
        tape.gradient(l_ours, [x, ours.kernel.value, ours.bias.value]),
        tape.gradient(l_ref, [x, ref.kernel.value, ref.bias.value]),
    )
    for a, b in grads:
        scale = float(np.max(np.abs(b.numpy().astype(np.float32))))
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=tol, atol=tol * scale)
    ops = _graph_ops(ours, shape, dtype)
    assert ("Conv2D" not in ops) == fast, ops


def test_conv_without_static_size_runs_keras_conv():
    layer = Conv2D(4, 3, padding="same")
    layer.build((None, None, None, 2))
    assert "Conv2D" in _graph_ops(layer, (None, None, None, 2), tf.float32)
    x = np.random.default_rng(0).standard_normal((1, 1, 1, 2)).astype(np.float32)
    expected = x[0, 0, 0] @ layer.kernel.numpy()[1, 1]  # the centre tap
    np.testing.assert_allclose(layer(x).numpy()[0, 0, 0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 28, 28, 3), (2, 5, 7, 3), (40, 3), (1, 8, 8, 3)])
def test_normalization_equals_keras_normalization(shape):
    ours = Normalization(mean=MEAN, variance=[s * s for s in STD])
    ref = keras.layers.Normalization(mean=MEAN, variance=[s * s for s in STD])
    x = np.random.default_rng(len(shape)).random(shape, dtype=np.float32)
    np.testing.assert_allclose(ours(x).numpy(), ref(x).numpy(), rtol=1e-5, atol=1e-5)
    assert _image_divides(ours, shape) == []
    assert _image_divides(ours, (None,) * (len(shape) - 1) + (3,)) == []
    assert _image_divides(ref, shape)  # what it replaces: a subtract and a divide of the image


def test_inverted_normalization_runs_keras_code():
    ours = Normalization(mean=MEAN, variance=[s * s for s in STD], invert=True)
    ref = keras.layers.Normalization(mean=MEAN, variance=[s * s for s in STD], invert=True)
    x = np.random.default_rng(0).random((2, 4, 4, 3), dtype=np.float32)
    np.testing.assert_allclose(ours(x).numpy(), ref(x).numpy(), rtol=1e-6)


def test_net_of_keras_layers_reads_our_weights_and_agrees(tmp_path):
    # Same weight paths as Keras' layers: a twin of Keras' own classes loads the net's
    # .weights.h5 and computes the same features (8x student input: every fast path runs).
    net = build_model("resnet_gn", 3, mean=MEAN, std=STD, planes=(8, 8, 16, 16))
    ours = (Conv2D, GroupNormalization, Normalization)
    assert sum(type(la) in ours for la in net.layers) == 12 + 12 + 1  # convs, norms, input

    twin = keras.models.clone_model(
        net, clone_function=lambda la: _keras_class(la).from_config(la.get_config())
    )
    assert not any(type(la) in ours for la in twin.layers)
    rng = np.random.default_rng(0)
    for v in net.weights:
        v.assign(rng.standard_normal(v.shape).astype(np.float32) * 0.3 + ("gamma" in v.path))
    path = str(tmp_path / "net.weights.h5")
    net.save_weights(path)
    twin.load_weights(path)
    x = np.random.default_rng(1).random((2, 28, 28, 3), dtype=np.float32)
    np.testing.assert_allclose(
        net(x)["logits"].numpy(), twin(x)["logits"].numpy(), rtol=1e-4, atol=1e-4
    )


def test_net_saved_with_keras_layers_loads_with_the_fast_ones(tmp_path):
    from kd_histo.models import load_model

    net = build_model("resnet_gn", 3, mean=MEAN, std=STD, planes=(8, 8, 16, 16))
    ours = (Conv2D, GroupNormalization, Normalization)
    old = keras.models.clone_model(  # as nets were saved before the twins
        net, clone_function=lambda la: _keras_class(la).from_config(la.get_config())
    )
    rng = np.random.default_rng(2)
    old.set_weights([rng.standard_normal(w.shape).astype(np.float32) * 0.3 for w in net.weights])
    path = str(tmp_path / "old.keras")
    old.save(path)
    loaded = load_model(path, expected_num_classes=3)
    assert sum(type(la) in ours for la in loaded.layers) == 25 and loaded.name == old.name
    x = np.random.default_rng(3).random((2, 28, 28, 3), dtype=np.float32)
    for key in ("logits", "features"):
        np.testing.assert_allclose(
            loaded(x)[key].numpy(), old(x)[key].numpy(), rtol=1e-4, atol=1e-4
        )
