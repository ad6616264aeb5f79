"""Features of different widths (issue 28, Deliver 3): a learned 1x1 projection of the student's
map (FitNets' regressor) feeds the feature loss; it trains with the student and never leaves the
distiller (the saved student is the plain net, at the plain net's cost)."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import TINY_NET_KW, TINY_PLANES, tiny_distill_config

from kd_histo.evaluation.cost import count_flops
from kd_histo.models import build_model, load_model
from kd_histo.training import losses as L
from kd_histo.training import train
from kd_histo.training.config import DistillConfig, NetConfig
from kd_histo.training.distiller import ResolutionDistiller, losses_for

TEACHER_PLANES, STUDENT_PLANES = TINY_PLANES, (2, 4, 4, 8)


def _nets(seed=0):
    keras.utils.set_random_seed(seed)
    student = build_model("resnet_gn", 4, name="student", planes=STUDENT_PLANES, **TINY_NET_KW)
    teacher = build_model("resnet_gn", 4, name="teacher", planes=TEACHER_PLANES, **TINY_NET_KW)
    return student, teacher


def _batch(n=8, hr=32, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "hr": rng.random((n, hr, hr, 3), dtype=np.float32),
        "lr": rng.random((n, hr // 2, hr // 2, 3), dtype=np.float32),
        "label": np.arange(n, dtype=np.int32) % 4,
    }


def _values(layers):
    return [w.numpy().copy() for layer in layers for w in layer.weights]


def test_half_width_student_trains_through_its_projection():
    student, teacher = _nets()
    d = ResolutionDistiller(student, teacher, losses_for(DistillConfig()))
    (proj,) = d.feature_projections
    assert proj.filters == 16 and proj.kernel.shape == (1, 1, 8, 16)
    assert {id(w) for w in proj.trainable_weights} <= {id(w) for w in d.trainable_weights}
    d.compile(keras.optimizers.Adam(1e-2))
    p0, s0, t0 = _values([proj]), _values([student]), _values([teacher])
    b = _batch()
    logs = [d.train_on_batch(b, return_dict=True) for _ in range(6)]
    for name in ("loss", "feature_loss"):
        losses = [float(log[name]) for log in logs]
        assert all(np.isfinite(losses)) and losses[-1] < losses[0], (name, losses)
    assert all(not np.array_equal(a, w) for a, w in zip(p0, _values([proj])))
    assert any(not np.array_equal(a, w) for a, w in zip(s0, _values([student])))
    assert all(np.array_equal(a, w) for a, w in zip(t0, _values([teacher])))


def test_projected_loss_matches_numpy():
    student, teacher = _nets(seed=1)
    loss = L.FeatureMapKD("maxpool", "l2")
    layers = loss.build(teacher.output, student.output)
    (proj,) = layers["feature_projections"]
    b = _batch(4)
    s = student(b["lr"])["features"].numpy()
    t = teacher(b["hr"])["features"].numpy()
    value = float(loss.compute_loss({"features": t}, {"features": s}))
    kernel, bias = proj.kernel.numpy()[0, 0], proj.bias.numpy()
    projected = np.einsum("bhwc,cd->bhwd", s, kernel) + bias
    # adaptive max-pool of a map twice the student's size: max over 2x2 blocks
    bsz, h, w, c = t.shape
    pooled = t.reshape(bsz, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    np.testing.assert_allclose(value, np.mean((projected - pooled) ** 2), rtol=1e-5)


def test_same_width_builds_no_projection():
    keras.utils.set_random_seed(0)
    student = build_model("resnet_gn", 4, name="student", planes=TEACHER_PLANES, **TINY_NET_KW)
    teacher = build_model("resnet_gn", 4, name="teacher", planes=TEACHER_PLANES, **TINY_NET_KW)
    d = ResolutionDistiller(student, teacher)
    assert not hasattr(d, "feature_projections")
    assert len(d.trainable_weights) == len(student.trainable_weights)


@pytest.fixture(scope="module")
def teacher_dir(tiny_shards, tmp_path_factory):
    t_net = NetConfig(planes=TEACHER_PLANES, stem="small")
    out = tmp_path_factory.mktemp("wide") / "teacher"
    return train.train(
        tiny_distill_config(tiny_shards, out, mode="teacher", net=t_net, epochs=1)
    ).model_dir


@pytest.mark.parametrize("cached", [False, True])
def test_saved_student_is_the_plain_net_at_its_cost(tiny_shards, teacher_dir, tmp_path, cached):
    s_net = NetConfig(planes=STUDENT_PLANES, stem="small")
    cache = str(tmp_path / "cache") if cached else ""
    distill = DistillConfig(teacher=teacher_dir, teacher_cache=cache)
    result = train.train(
        tiny_distill_config(
            tiny_shards, tmp_path / "s", mode="distill", net=s_net, distill=distill, epochs=1
        )
    )
    assert all(np.isfinite(result.history["feature_loss"]))
    saved = load_model(os.path.join(result.model_dir, "model.keras"))
    names = [layer.name for layer in saved._flatten_layers()]
    assert not [n for n in names if "projection" in n]
    plain = build_model("resnet_gn", 4, planes=STUDENT_PLANES, **TINY_NET_KW)
    assert saved.count_params() == plain.count_params()
    assert count_flops(saved, 16) == count_flops(plain, 16) > 0
    assert saved(tf.zeros((1, 16, 16, 3)))["features"].shape[-1] == STUDENT_PLANES[-1]


def test_a_saved_distiller_keeps_its_projection(tmp_path):
    student, teacher = _nets(seed=2)
    d = ResolutionDistiller(student, teacher)
    d.compile(keras.optimizers.Adam(1e-2))
    d.train_on_batch(_batch(), return_dict=True)
    d.save(str(tmp_path / "distiller.keras"))
    d2 = keras.saving.load_model(str(tmp_path / "distiller.keras"), safe_mode=True)
    (p1,), (p2,) = d.feature_projections, d2.feature_projections
    np.testing.assert_array_equal(p1.kernel.numpy(), p2.kernel.numpy())
    b = _batch(seed=5)
    np.testing.assert_allclose(
        float(d2.compute_losses(b)[0]["feature_loss"]),
        float(d.compute_losses(b)[0]["feature_loss"]),
        rtol=1e-6,
    )
