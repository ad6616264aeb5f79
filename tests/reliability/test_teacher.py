"""The teacher a student learns from: a shared teacher cache that must not go stale when the data
folder is reconverted or the teacher file replaced."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_histo import teacher_cache as TC
from kd_histo.data.pipeline import PipelineConfig, make_dataset
from kd_histo.models import build_model

from .helpers import write_tiny_shards

pytestmark = pytest.mark.reliability

KW = dict(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], planes=(4, 8, 8, 16), stem="small")


def _cache(teacher, path, data_dir, cache_dir, log):
    cfg = PipelineConfig(str(data_dir), batch_size=4, factor=2, augment="none")
    return TC.for_training(teacher, path, cfg, str(cache_dir), map_size=(2, 2), feature_mode="maxpool",
                           log=log)


def _assert_cache_is_the_teachers(cache, teacher, data_dir):
    cfg = PipelineConfig(str(data_dir), batch_size=8, factor=2, augment="none")
    batch = next(iter(make_dataset(cfg, "train", training=False)))
    logits, _ = cache.lookup(cache.rows(batch), tf.zeros([8], tf.int32))
    real = teacher(batch["hr"], training=False)["logits"].numpy()
    np.testing.assert_allclose(logits.numpy(), real, rtol=1e-5, atol=1e-5)


def test_teacher_cache_is_rebuilt_when_the_data_or_the_teacher_changes(tmp_path):
    keras.utils.set_random_seed(0)
    teacher = build_model("resnet_gn", 4, name="teacher", **KW)
    path = str(tmp_path / "teacher.keras")
    teacher.save(path)
    data, cache_dir = tmp_path / "data", tmp_path / "cache"
    write_tiny_shards(data, per_class=2, num_shards=1, unlabeled=0, seed=0)
    built = []
    cache = _cache(teacher, path, data, cache_dir, built.append)
    assert len(built) == 1
    _assert_cache_is_the_teachers(cache, teacher, data)
    _cache(teacher, path, data, cache_dir, built.append)
    assert len(built) == 1  # same data, same teacher: reused

    # the folder reconverted with other settings: same paths, same record keys, other pixels
    write_tiny_shards(data, per_class=2, num_shards=1, unlabeled=0, seed=7)
    cache = _cache(teacher, path, data, cache_dir, built.append)
    assert len(built) == 2, "a reconverted data folder must rebuild the cache"
    _assert_cache_is_the_teachers(cache, teacher, data)

    # another teacher saved over the file, its size and mtime as before (a copy keeping times)
    before = os.stat(path)
    other = build_model("resnet_gn", 4, name="teacher", **KW)  # new random weights
    other.save(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.path.getsize(path) == before.st_size
    cache = _cache(other, path, data, cache_dir, built.append)
    assert len(built) == 3, "another teacher file must rebuild the cache"
    _assert_cache_is_the_teachers(cache, other, data)
