"""FusedAdam: Keras' Adam update (decoupled weight decay, schedules) on TF's fused kernel."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_histo.training.optimizers import FusedAdam


def numpy_adam(w, grads, lrs, wd=0.0, b1=0.9, b2=0.999, eps=1e-7):
    """Reference: Keras 3 Adam (decay first, at the step's learning rate, then the Adam step)."""
    w, m, v = w.astype(np.float64), np.zeros_like(w, np.float64), np.zeros_like(w, np.float64)
    for t, (g, lr) in enumerate(zip(grads, lrs), 1):
        w = w - w * wd * lr
        m = m + (g - m) * (1 - b1)
        v = v + (g * g - v) * (1 - b2)
        w = w - lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
    return w


def _run(opt, w0, grads, dtype="float32"):
    var = keras.Variable(w0.copy(), dtype=dtype)
    opt.build([var])
    step = tf.function(lambda g: opt.apply([g], [var]))
    for g in grads:
        step(tf.constant(g, dtype))
    return np.asarray(var.numpy(), np.float64)


@pytest.mark.parametrize("weight_decay", [None, 1e-2])
def test_fused_adam_matches_numpy_and_keras(weight_decay):
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5, 7)).astype(np.float32)
    grads = [rng.normal(size=(5, 7)).astype(np.float32) * s for s in (1.0, 1e-3, 0.3, 1e-5)]
    schedule = keras.optimizers.schedules.CosineDecay(0.01, decay_steps=4)
    lrs = [float(schedule(t)) for t in range(4)]
    want = numpy_adam(w0, grads, lrs, wd=weight_decay or 0.0)
    fused = _run(FusedAdam(schedule, weight_decay=weight_decay), w0, grads)
    plain = _run(keras.optimizers.Adam(schedule, weight_decay=weight_decay), w0, grads)
    assert np.abs(fused - w0).max() > 1e-3  # it moved
    np.testing.assert_allclose(fused, want, atol=2e-6)
    np.testing.assert_allclose(fused, plain, atol=2e-6)


def test_what_the_kernel_cannot_do_falls_back_to_keras():
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=(3, 4)).astype(np.float32)
    grads = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3)]
    np.testing.assert_array_equal(  # amsgrad: Keras' own update, bit for bit
        _run(FusedAdam(1e-2, amsgrad=True), w0, grads),
        _run(keras.optimizers.Adam(1e-2, amsgrad=True), w0, grads),
    )
    np.testing.assert_allclose(  # float16 variables
        _run(FusedAdam(1e-2), w0, grads, dtype="float16"),
        _run(keras.optimizers.Adam(1e-2), w0, grads, dtype="float16"),
        atol=1e-3,
    )


def test_fused_adam_is_saved_and_loaded_with_a_compiled_model(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(FusedAdam(1e-3, weight_decay=1e-4), loss="mse")
    model.fit(np.ones((4, 3)), np.zeros((4, 2)), epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded.optimizer) is FusedAdam and loaded.optimizer.weight_decay == pytest.approx(
        1e-4
    )
    assert int(loaded.optimizer.iterations) == 1
