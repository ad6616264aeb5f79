"""oneDNN: the nets train and predict with TF's oneDNN CPU kernels on (BUILD_NOTES.md, "oneDNN").

TF 2.16's oneDNN strided 1x1 backward-weights kernel overruns its buffer when the input has fewer
than 16 channels (on AVX-512 CPUs it aborts with "malloc(): corrupted top size" or a segfault).
The projection shortcut is therefore a subsample followed by a 1x1/1 conv
(:func:`kd_histo.models.resnet_gn.projection_conv`); these tests check that it equals the strided
conv it replaces and that the demo's small-stem net (stage-2 shortcut input: 8 channels, 64 px,
which aborted before) trains under oneDNN. oneDNN is read once when TensorFlow loads, and the test
session runs with it off (conftest.py), so the oneDNN runs are fresh interpreters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import REPO
from tensorflow.python.util import _pywrap_util_port

from kd_histo.models import build_model
from kd_histo.models.resnet_gn import projection_conv

MEAN, STD = [0.6, 0.5, 0.7], [0.2, 0.25, 0.15]
DEMO_NET = dict(planes=(8, 16, 32, 64), stem="small")  # flags/demo/common.flags


def _python(code: str, onednn: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.mark.parametrize("px", [9, 16])  # odd sizes: both give ceil(px / 2) outputs
@pytest.mark.parametrize("stride", [1, 2])
def test_projection_conv_equals_strided_1x1_conv(px, stride):
    rng = np.random.default_rng(px + stride)
    x = tf.constant(rng.standard_normal((2, px, px, 8)).astype(np.float32))
    inp = keras.Input((None, None, 8))
    new = keras.Model(inp, projection_conv(inp, 16, stride, "down_conv"))
    old = keras.layers.Conv2D(16, 1, strides=stride, padding="valid", use_bias=False)
    old.build((None, None, None, 8))
    kernel = new.get_layer("down_conv").kernel
    assert tuple(kernel.shape) == (1, 1, 8, 16)  # same weights as the strided conv: files load
    old.kernel.assign(kernel)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y_new, y_old = new(x), old(x)
        w = tf.constant(rng.standard_normal(y_old.shape).astype(np.float32))
        l_new, l_old = tf.reduce_sum(w * y_new), tf.reduce_sum(w * y_old)
    assert y_new.shape == y_old.shape == (2, -(-px // stride), -(-px // stride), 16)
    np.testing.assert_allclose(y_new.numpy(), y_old.numpy(), rtol=1e-6, atol=1e-6)
    for a, b in zip(tape.gradient(l_new, [x, kernel]), tape.gradient(l_old, [x, old.kernel])):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)


def test_every_strided_shortcut_is_subsample_then_unit_stride_conv():
    for arch, kw in (("resnet_gn", DEMO_NET), ("resnet50", dict(width_scale=1 / 16, groups=4))):
        m = build_model(arch, 3, mean=MEAN, std=STD, **kw)
        convs = [la for la in m.layers if isinstance(la, keras.layers.Conv2D)]
        assert [la.name for la in convs if la.kernel_size == (1, 1) and la.strides != (1, 1)] == []
        downs = [la for la in convs if la.name.endswith("_down_conv")]
        assert len(downs) >= 3
        assert len([la for la in m.layers if la.name.endswith("_down_conv_subsample")]) == 3


_TRAIN_PREDICT = textwrap.dedent("""
    import json, sys
    import numpy as np, keras, tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port
    from kd_histo.training.config import DistillConfig
    from kd_histo.training.distiller import ResolutionDistiller, losses_for
    from kd_histo.models import build_model
    sys.path[:0] = ["tests", "tests/models"]  # support.py, then this module
    from test_onednn import predict
    keras.utils.set_random_seed(0)
    net = dict(planes=(8, 16, 32, 64), stem="small", mean=[0.6, 0.5, 0.7], std=[0.2, 0.25, 0.15])
    rng = np.random.default_rng(0)
    batch = {"hr": rng.random((2, 64, 64, 3), dtype=np.float32),
             "label": np.array([0, 2], np.int32)}
    teacher = build_model("resnet_gn", 3, name="teacher", **net)
    student = build_model("resnet_gn", 3, name="student", **net)
    before = [w.numpy().copy() for w in student.trainable_weights]
    # The student reads the 64 px view: KD + feature loss + CE, all through its backward pass.
    distiller = ResolutionDistiller(student, teacher, losses_for(DistillConfig(ce_weight=1.0)),
                                    student_view="hr")
    distiller.compile(keras.optimizers.Adam(1e-3))
    losses = distiller.fit(tf.data.Dataset.from_tensors(batch).repeat(3), epochs=1,
                           verbose=0).history["loss"]
    changed = [not np.array_equal(a, w.numpy()) for a, w in zip(before, student.trainable_weights)]
    student.save(sys.argv[1])
    np.savez(sys.argv[2], **predict(sys.argv[1]))
    print(json.dumps({"onednn": bool(_pywrap_util_port.IsMklEnabled()), "losses": losses,
                      "student_changed": all(changed)}))
""")


def predict(path: str) -> dict:
    """Outputs of a saved net at 64 and 23 px, loaded the way the inference binaries load it."""
    from kd_histo.models import load_model

    model = load_model(path)
    out = {}
    for px in (64, 23):
        x = np.random.default_rng(px).random((4, px, px, 3), dtype=np.float32)
        y = model.predict_on_batch(x)
        out.update({f"logits{px}": y["logits"], f"features{px}": y["features"]})
    return out


@pytest.fixture(scope="module")
def onednn_run(tmp_path_factory):
    """Trains the demo net for 3 steps and predicts with oneDNN on, in a fresh interpreter."""
    d = tmp_path_factory.mktemp("onednn")
    model, npz = str(d / "model.keras"), str(d / "outputs.npz")
    proc = _python(_TRAIN_PREDICT, "1", model, npz)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return res, model, dict(np.load(npz))


def test_small_stem_net_trains_with_onednn_on(onednn_run):
    # Before projection_conv this aborted in the first step on AVX-512 CPUs (heap corruption).
    res, _, _ = onednn_run
    assert res["onednn"] is True
    assert res["student_changed"] and len(res["losses"]) == 1
    assert np.isfinite(res["losses"][0]), res


def test_inference_agrees_with_onednn_on_and_off(onednn_run, tmp_path):
    _, model, on = onednn_run
    if _pywrap_util_port.IsMklEnabled():  # a session run with oneDNN on: compare in a subprocess
        code = (
            "import sys; sys.path[:0] = ['tests', 'tests/models']; import numpy as np; "
            "from test_onednn import predict; np.savez(sys.argv[2], **predict(sys.argv[1]))"
        )
        proc = _python(code, "0", model, str(tmp_path / "off.npz"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        off = dict(np.load(tmp_path / "off.npz"))
    else:
        off = predict(model)
    assert set(on) == set(off) == {"logits64", "features64", "logits23", "features23"}
    for key, a in on.items():
        b = off[key]
        assert a.shape == b.shape and np.std(b) > 0.1  # a real signal, not all zeros
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.std(b)), err_msg=key)


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_binaries_turn_onednn_on_unless_the_user_set_it(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if preset is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = preset
    code = "import os, kd_histo.cli.flags_common; print(os.environ['TF_ENABLE_ONEDNN_OPTS'])"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == expected


# -- formulations for speed (BUILD_NOTES.md, "oneDNN and step speed"): equal to what they replace --


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(
    "shape, groups", [((2, 9, 7, 16), 8), ((3, 4, 4, 6), 3), ((2, 1, 1, 32), 8)]
)
def test_group_norm_equals_keras_group_normalization(shape, groups, dtype):
    from kd_histo.models.resnet_gn import GroupNormalization

    rng = np.random.default_rng(sum(shape))
    x = tf.constant((rng.standard_normal(shape) * 3 + 2).astype(dtype))  # mean far from 0
    ours = GroupNormalization(groups=groups, epsilon=1e-5, dtype=dtype)
    ref = keras.layers.GroupNormalization(groups=groups, epsilon=1e-5, dtype=dtype)
    ours.build(shape)
    ref.build(shape)
    for a, b in ((ours.gamma, ref.gamma), (ours.beta, ref.beta)):
        v = rng.standard_normal(shape[-1]).astype(np.float32) * 0.5 + 1
        a.assign(v)
        b.assign(v)
    w = tf.constant(rng.standard_normal(shape).astype(dtype))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y_ours, y_ref = ours(x), ref(x)
        l_ours = tf.reduce_sum(tf.cast(w * y_ours, tf.float32))
        l_ref = tf.reduce_sum(tf.cast(w * y_ref, tf.float32))
    assert y_ours.dtype == y_ref.dtype == dtype
    tol = 1e-5 if dtype == "float32" else 2e-3
    np.testing.assert_allclose(y_ours.numpy(), y_ref.numpy(), rtol=tol, atol=tol)
    g_ours = tape.gradient(l_ours, [x, ours.gamma.value, ours.beta.value])
    g_ref = tape.gradient(l_ref, [x, ref.gamma.value, ref.beta.value])
    for a, b in zip(g_ours, g_ref):
        scale = float(np.max(np.abs(b.numpy().astype(np.float32))))
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=tol, atol=tol * scale)


def test_group_norm_keeps_keras_weight_paths(tmp_path):
    # Keras files weights under the snake-cased class name: a net built with the Keras layer
    # (as before) and one built with ours read each other's .weights.h5 files.
    m = build_model("resnet_gn", 3, mean=MEAN, std=STD, **DEMO_NET)
    gns = [la for la in m.layers if isinstance(la, keras.layers.GroupNormalization)]
    assert len(gns) == 12 and all(type(la).__module__.startswith("kd_histo") for la in gns)

    def keras_layers(la):
        keras_gn = keras.layers.GroupNormalization
        return (keras_gn if isinstance(la, keras_gn) else la.__class__).from_config(la.get_config())

    keras_twin = keras.models.clone_model(m, clone_function=keras_layers)
    assert {type(la) for la in keras_twin.layers} >= {keras.layers.GroupNormalization}
    rng = np.random.default_rng(0)
    for v in keras_twin.weights:
        gamma = "gamma" in v.path
        v.assign(rng.standard_normal(v.shape).astype(np.float32) * 0.2 + (1 if gamma else 0))
    path = str(tmp_path / "keras_layers.weights.h5")
    keras_twin.save_weights(path)
    m.load_weights(path)
    x = np.random.default_rng(1).random((2, 33, 33, 3), dtype=np.float32)
    np.testing.assert_allclose(
        m(x)["features"].numpy(), keras_twin(x)["features"].numpy(), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("px", [1, 2, 7])
def test_stride_one_same_conv_equals_zero_padding_then_valid(px):
    from kd_histo.models.resnet_gn import padded_conv

    inp = keras.Input((None, None, 8))
    new = keras.Model(inp, padded_conv(inp, 16, 3, 1, "c"))
    assert not any(isinstance(la, keras.layers.ZeroPadding2D) for la in new.layers)
    old = keras.Sequential(
        [
            keras.Input((None, None, 8)),
            keras.layers.ZeroPadding2D(1),
            keras.layers.Conv2D(16, 3, padding="valid", use_bias=False),
        ]
    )
    old.layers[-1].kernel.assign(new.get_layer("c").kernel)
    x = tf.constant(np.random.default_rng(px).standard_normal((2, px, px, 8)).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y_new, y_old = new(x), old(x)
        l_new, l_old = tf.reduce_sum(y_new * y_new), tf.reduce_sum(y_old * y_old)
    np.testing.assert_allclose(y_new.numpy(), y_old.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        tape.gradient(l_new, x).numpy(), tape.gradient(l_old, x).numpy(), rtol=1e-5, atol=1e-4
    )
