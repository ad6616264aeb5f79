"""make_dataset end to end on the tiny shards: determinism, labels, mixing, sources, options."""

import shutil

import numpy as np
import pytest

from kd_histo import schema
from kd_histo.data.pipeline import (
    PipelineConfig,
    epoch_examples,
    make_dataset,
    steps_per_epoch,
    training_stream,
)


def _batches(cfg, split="train", training=True, epochs=1):
    """The batches of epochs 0 .. epochs - 1 (of one pass when not training)."""
    return [
        {k: v.numpy() for k, v in b.items()}
        for e in range(epochs if training else 1)
        for b in make_dataset(cfg, split, training, epoch=e)
    ]


def test_same_seed_same_batches_other_seed_other_batches(tiny_shards):
    cfg = PipelineConfig(
        tiny_shards,
        batch_size=4,
        factor=2,
        augment="paper+hed",
        seed=5,
        unlabeled_ratio=0.3,
    )
    a, b = _batches(cfg), _batches(cfg)
    assert len(a) == len(b) == steps_per_epoch(cfg)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    c = _batches(PipelineConfig(**{**cfg.__dict__, "seed": 6}))
    assert np.abs(a[0]["hr"] - c[0]["hr"]).max() > 1e-3


def test_epochs_differ_but_the_run_repeats(tiny_shards):
    cfg = PipelineConfig(tiny_shards, batch_size=4, augment="paper", seed=1)
    two = _batches(cfg, epochs=2)
    half = len(two) // 2
    assert not np.allclose(two[0]["hr"], two[half]["hr"])  # new shuffle and new augmentation
    again = _batches(cfg, epochs=2)
    np.testing.assert_array_equal(two[half]["hr"], again[half]["hr"])


def _hr(ds, n):
    return [b["hr"].numpy() for b in ds.take(n)]


@pytest.mark.parametrize(
    "options",
    [{"augment": "paper+hed"}, {"unlabeled_ratio": 0.5}, {"class_balanced": True, "cache": True}],
)
def test_an_epoch_is_a_pure_function_of_the_seed_and_its_number(tiny_shards, options):
    """What makes a resumed run exact (issue 31, case 8): the stream started at epoch 2 is the
    uninterrupted stream's epochs 2 and 3, whatever the process's global seed and however often
    an epoch is read, and each epoch draws anew."""
    import tensorflow as tf

    cfg = PipelineConfig(tiny_shards, batch_size=4, seed=7, **options)
    steps = steps_per_epoch(cfg)
    tf.random.set_seed(0)
    run = _hr(training_stream(cfg, steps=steps), 4 * steps)
    tf.random.set_seed(1234)
    resumed = _hr(training_stream(cfg, steps=steps, first_epoch=2), 2 * steps)
    for a, b in zip(run[2 * steps :], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    third = _hr(make_dataset(cfg, epoch=3).repeat(2), 2 * steps)
    for a, b in zip(run[3 * steps :] * 2, third, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(run[0], run[steps])  # epoch 1 is not epoch 0 again


def test_a_stream_of_other_step_counts_takes_that_many_batches_an_epoch(tiny_shards):
    cfg = PipelineConfig(tiny_shards, batch_size=4, seed=2, augment="flips")
    assert steps_per_epoch(cfg) == 4
    for steps in (2, 6):
        run = _hr(training_stream(cfg, steps=steps), 3 * steps)
        resumed = _hr(training_stream(cfg, steps=steps, first_epoch=1), 2 * steps)
        for a, b in zip(run[steps:], resumed, strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        training_stream(cfg, steps=0)


def test_unlabeled_examples_carry_minus_one(tiny_shards):
    only_unl = _batches(PipelineConfig(tiny_shards, batch_size=4, labeled=False))
    labels = np.concatenate([b["label"] for b in only_unl])
    assert len(labels) == 8 and (labels == -1).all()
    sources = {s.decode().split(":")[1] for b in only_unl for s in b["source"]}
    assert sources == {"unlabeled"}


def test_mixing_ratio_holds_through_make_dataset(tiny_shards):
    cfg = PipelineConfig(tiny_shards, batch_size=1, unlabeled_ratio=0.3, augment="none", seed=2)
    labels = np.concatenate([b["label"] for b in _batches(cfg, epochs=13)])
    assert len(labels) == 13 * epoch_examples(cfg) == 299
    assert abs((labels == -1).mean() - 0.3) < 0.09  # 3 binomial sd at n = 299
    assert set(labels[labels >= 0]) == {0, 1, 2, 3}


def test_class_balanced_option(tiny_shards):
    cfg = PipelineConfig(tiny_shards, batch_size=16, class_balanced=True, augment="none")
    labels = np.concatenate([b["label"] for b in _batches(cfg, epochs=30)])
    freq = np.bincount(labels, minlength=4) / len(labels)
    np.testing.assert_allclose(freq, 0.25, atol=0.08)  # 4 binomial sd at n = 480


def test_eval_keeps_slide_ids_and_coordinates_in_file_order(tiny_shards):
    got = _batches(PipelineConfig(tiny_shards, batch_size=3), "test", training=False)
    ids = [s for b in got for s in b["slide_id"]]
    xs = [int(x) for b in got for x in b["x"]]
    expected_ids, expected_xs = [], []
    for path in schema.shard_paths(tiny_shards, "test"):
        import tensorflow as tf

        for rec in tf.data.TFRecordDataset(path):
            ex = schema.parse_example_numpy(rec.numpy())
            expected_ids.append(ex["slide_id"])
            expected_xs.append(ex["x"])
    assert ids == expected_ids and xs == expected_xs


def test_extra_unlabeled_dirs_force_minus_one_and_fraction_subsets(
    tiny_shards, tiny_shards_without
):
    extra = tiny_shards_without(
        "unlabeled"
    )  # no unlabeled split: its labeled splits join the pool, label -1
    cfg = PipelineConfig(
        tiny_shards,
        batch_size=1,
        labeled=False,
        unlabeled_dirs=(extra,),
        augment="none",
        drop_remainder=False,
    )
    full = [b for b in _batches(cfg)]
    assert len(full) == epoch_examples(cfg) == 8 + 16 + 8 + 8
    assert all(b["label"][0] == -1 for b in full)
    assert any(b["source"][0].startswith(b"synthetic:train") for b in full)
    half = {
        b["source"][0] + b["slide_id"][0]
        for b in _batches(PipelineConfig(**{**cfg.__dict__, "unlabeled_fraction": 0.5}))
    }
    assert 0 < len(half) < 40


def test_normalize_uses_dataset_json_mean_and_std(tiny_shards):
    info = schema.DatasetInfo.read(tiny_shards)
    raw = _batches(PipelineConfig(tiny_shards, batch_size=4), "val", training=False)[0]
    norm = _batches(
        PipelineConfig(tiny_shards, batch_size=4, normalize=True), "val", training=False
    )[0]
    for k in ("hr", "lr"):
        np.testing.assert_allclose(
            norm[k], (raw[k] - info.mean) / np.array(info.std), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr_method": "nearest"}, "lr_method"),
        ({"augment": "heavy"}, "augment"),
        ({"unlabeled_ratio": 2.0}, "unlabeled_ratio"),
        ({"batch_size": 0}, "batch_size"),
        ({"unlabeled_fraction": 0.0}, "unlabeled_fraction"),
        ({"factor": -2.0}, "factor"),
        ({"shuffle_buffer": 0}, "shuffle_buffer"),
    ],
)
def test_bad_config_is_a_clear_error(tiny_shards, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PipelineConfig(tiny_shards, **kwargs)


def test_unlabeled_dirs_as_one_string_is_a_clear_error(tiny_shards):
    with pytest.raises(TypeError, match="tuple of folders"):
        PipelineConfig(tiny_shards, unlabeled_dirs="/data/extra")


def test_missing_unlabeled_data_is_a_clear_error(tiny_shards, tmp_path):
    d = tmp_path / "nounl"
    shutil.copytree(tiny_shards, d)
    for p in d.glob("unlabeled-*"):
        p.unlink()
    with pytest.raises(ValueError, match="no unlabeled data"):
        make_dataset(PipelineConfig(str(d), unlabeled_ratio=0.5))


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_cache_changes_nothing_but_speed(tiny_shards, seed):
    # Three epochs: the shuffle buffer spans passes, so a file order that changed from pass to
    # pass (which a cache would freeze) shows up; several seeds so that no coin flip hides it.
    cfg = PipelineConfig(tiny_shards, batch_size=4, augment="paper", seed=seed)
    plain = _batches(cfg, epochs=3)
    cached = _batches(PipelineConfig(**{**cfg.__dict__, "cache": True}), epochs=3)
    assert len(plain) == len(cached) > 0
    for x, y in zip(plain, cached):
        np.testing.assert_array_equal(x["source"], y["source"])
        np.testing.assert_array_equal(x["hr"], y["hr"])
    evals = [_batches(PipelineConfig(tiny_shards, cache=c), "val", False) for c in (False, True)]
    np.testing.assert_array_equal(evals[0][0]["lr"], evals[1][0]["lr"])
