"""Teacher cache: stored outputs equal the live teacher's, per tile and dihedral transform."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_histo.data.pipeline import PipelineConfig, make_dataset
from kd_histo.models import build_model
from kd_histo.training import cache_store as TC
from kd_histo.training import losses as L
from kd_histo.training.distiller import ResolutionDistiller

KW = dict(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], planes=(4, 8, 8, 16), stem="small")


def test_dihedral_transforms_are_the_eight_symmetries():
    x = tf.reshape(tf.range(9 * 2, dtype=tf.float32), [1, 3, 3, 2])
    outs = [TC.dihedral(x, k).numpy() for k in range(8)]
    assert len({o.tobytes() for o in outs}) == 8
    np.testing.assert_array_equal(outs[0], x.numpy())
    np.testing.assert_array_equal(outs[1], np.rot90(x.numpy(), 1, axes=(1, 2)))
    np.testing.assert_array_equal(outs[4], x.numpy()[:, :, ::-1])
    ks = tf.constant([3, 5])
    xb = tf.concat([x, x + 100], 0)
    per = TC.dihedral_per_example(xb, ks).numpy()
    np.testing.assert_array_equal(per[0], TC.dihedral(x, 3).numpy()[0])
    np.testing.assert_array_equal(per[1], TC.dihedral(x + 100, 5).numpy()[0])


@pytest.fixture(scope="module")
def setup(tiny_shards, tmp_path_factory):
    keras.utils.set_random_seed(0)
    teacher = build_model("resnet_gn", 4, name="teacher", **KW)
    student = build_model("resnet_gn", 4, name="student", **KW)
    cfg = PipelineConfig(tiny_shards, batch_size=4, factor=2, augment="none", drop_remainder=False)
    ev = make_dataset(cfg, "train", training=False)
    first = next(iter(ev))
    size = tuple(student(first["lr"])["features"].shape[1:3])
    cache = TC.build_cache(teacher, ev, str(tmp_path_factory.mktemp("cache")), map_size=size)
    return teacher, student, cfg, cache, size


def test_cache_holds_the_teachers_outputs(setup):
    teacher, _, cfg, cache, size = setup
    spec = cache.spec
    assert (spec.num_transforms, spec.num_classes, spec.map_size, spec.channels) == (8, 4, size, 16)
    batch = next(iter(make_dataset(cfg, "train", training=False)))
    rows = cache.rows(batch)
    for k in (0, 6):
        out = teacher(TC.dihedral(batch["hr"], k), training=False)
        logits, feats = cache.lookup(rows, tf.fill([4], k))
        np.testing.assert_allclose(logits.numpy(), out["logits"].numpy(), rtol=1e-5, atol=1e-6)
        target = L.resize_teacher_map(out["features"], size).numpy()
        np.testing.assert_allclose(feats.numpy(), target, rtol=2e-3, atol=2e-3)  # float16 storage


def test_reopened_cache_in_memory_equals_memmap(setup):
    _, _, cfg, cache, _ = setup
    mem = TC.TeacherCache(cache.cache_dir, in_memory=True)
    batch = next(iter(make_dataset(cfg, "train", training=False)))
    rows, ks = cache.rows(batch), tf.constant([0, 1, 2, 7])
    for x, y in zip(cache.lookup(rows, ks), mem.lookup(mem.rows(batch), ks)):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_attach_transforms_views_consistently_and_trains(setup):
    teacher, student, cfg, cache, size = setup
    plain = make_dataset(cfg, "train", training=False)
    attached = cache.attach(plain, training=True, seed=1)
    b0, b1 = next(iter(plain)), next(iter(attached))
    # each example's view is one of its 8 transforms; its cached logits are the teacher's on it
    live = teacher(b1["hr"], training=False)["logits"].numpy()
    np.testing.assert_allclose(b1["teacher_logits"].numpy(), live, rtol=1e-4, atol=1e-5)
    for i in range(4):
        assert any(
            np.array_equal(TC.dihedral(b0["lr"][i], k).numpy(), b1["lr"][i].numpy())
            for k in range(8)
        )
    d = ResolutionDistiller(student, None)
    d.compile(keras.optimizers.Adam(1e-2))
    n_batches = sum(1 for _ in plain)  # the stream's cardinality is unknown to Keras
    hist = d.fit(attached, epochs=1, steps_per_epoch=n_batches, verbose=0).history
    assert hist["kd_loss"][0] > 0 and hist["feature_loss"][0] > 0 and np.isfinite(hist["loss"][0])


def test_missing_tile_and_missing_cache_errors(setup, tmp_path):
    _, _, _, cache, _ = setup
    batch = {
        "source": tf.constant(["nowhere"]),
        "slide_id": tf.constant(["s"]),
        "x": tf.constant([0], tf.int64),
        "y": tf.constant([0], tf.int64),
    }
    with pytest.raises(tf.errors.InvalidArgumentError, match="missing from the teacher cache"):
        cache.rows(batch)
    with pytest.raises(FileNotFoundError, match="build the cache first"):
        TC.TeacherCache(str(tmp_path))
