"""Paired views: shapes per factor, lr == resize(hr) (same crop and augmentation), pyramid."""

import os

import numpy as np
import pytest
import tensorflow as tf

from kd_histo import schema
from kd_histo.data import views
from kd_histo.data.pipeline import PipelineConfig, make_dataset

from .data_helpers import block_mean


def _first(cfg, split="train", training=True):
    return {k: v.numpy() for k, v in next(iter(make_dataset(cfg, split, training))).items()}


@pytest.mark.parametrize(
    "hr,factor,expected",
    [(224, 2, 112), (224, 4, 56), (224, 8, 28), (224, 3.0, 75), (32, 1.5, 21), (4, 8, 1)],
)
def test_lr_size(hr, factor, expected):
    assert views.lr_size(hr, factor) == expected


def test_lr_size_rejects_bad_factor():
    with pytest.raises(ValueError, match="factor"):
        views.lr_size(32, 0)


@pytest.mark.parametrize("factor", [2, 4, 8, 2.5])
def test_shapes_and_dtypes_per_factor(tiny_shards, factor):
    b = _first(PipelineConfig(tiny_shards, batch_size=3, factor=factor))
    lr = views.lr_size(32, factor)
    assert b["hr"].shape == (3, 32, 32, 3) and b["hr"].dtype == np.float32
    assert b["lr"].shape == (3, lr, lr, 3) and b["lr"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["x"].dtype == np.int64 and b["y"].dtype == np.int64
    assert b["slide_id"].dtype == object and b["source"].dtype == object
    for k in ("hr", "lr"):
        assert 0.0 <= b[k].min() and b[k].max() <= 1.0


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_lr_is_area_downsample_of_augmented_hr(tiny_shards, factor):
    # With an integer factor, antialiased area resizing is the mean of f x f blocks: a NumPy
    # reference that holds only if lr was made from the same crop and the same augmentation.
    b = _first(PipelineConfig(tiny_shards, batch_size=4, factor=factor, augment="paper+hed"))
    np.testing.assert_allclose(b["lr"], block_mean(b["hr"], factor), atol=1e-5)


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
def test_lr_methods_follow_the_hr_view(tiny_shards, method):
    b = _first(
        PipelineConfig(tiny_shards, batch_size=4, factor=4, lr_method=method, augment="paper")
    )
    ref = block_mean(b["hr"], 4)
    resized = tf.clip_by_value(
        tf.image.resize(b["hr"], [8, 8], method=method, antialias=True), 0, 1
    ).numpy()
    np.testing.assert_allclose(b["lr"], resized, atol=1e-5)
    assert np.abs(b["lr"] - ref).mean() < 0.05  # same content as the area view, different kernel


def _decoded_tiles(data_dir, split):
    tiles = []
    for path in schema.shard_paths(data_dir, split):
        for rec in tf.data.TFRecordDataset(path):
            tiles.append(
                tf.io.decode_png(schema.parse_example_numpy(rec.numpy())["image"]).numpy() / 255.0
            )
    return tiles


def test_training_hr_is_a_random_crop_of_a_stored_tile(tiny_shards):
    tiles = _decoded_tiles(tiny_shards, "train")
    b = _first(PipelineConfig(tiny_shards, batch_size=6, hr_px=20, factor=2, augment="none"))
    offsets = set()
    for hr in b["hr"]:
        hits = [
            (oy, ox)
            for t in tiles
            for oy in range(13)
            for ox in range(13)
            if np.abs(t[oy : oy + 20, ox : ox + 20] - hr).max() < 1e-6
        ]
        assert hits, "hr is not a crop of any stored tile"
        offsets.add(hits[0])
    assert len(offsets) > 1  # crops are random, not all at one place


def test_eval_is_centre_crop_in_file_order_without_augmentation(tiny_shards):
    tiles = _decoded_tiles(tiny_shards, "val")
    batches = list(
        make_dataset(
            PipelineConfig(tiny_shards, batch_size=3, hr_px=20, factor=4, augment="paper"),
            "val",
            training=False,
        )
    )
    hr = np.concatenate([x["hr"].numpy() for x in batches])
    assert len(hr) == len(tiles)  # no drop_remainder in evaluation
    np.testing.assert_allclose(hr, np.stack([t[6:26, 6:26] for t in tiles]), atol=1e-6)


def _write_pyramid_shards(out_dir, tile_px=32, factor=2, n=6):
    rng = np.random.default_rng(0)
    os.makedirs(out_dir, exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(out_dir, schema.shard_name("train", 0, 1))) as w:
        for i in range(n):
            tile = rng.integers(0, 256, (tile_px, tile_px, 3), dtype=np.uint8)
            small = np.round(block_mean(tile.astype(np.float64), factor)).astype(np.uint8)
            ex = schema.make_example(
                tf.io.encode_png(tile).numpy(),
                tile_px,
                tile_px,
                label=i % 2,
                slide_id=f"s{i}",
                x=i,
                lr_image=tf.io.encode_png(small).numpy(),
                lr_factor=factor,
            )
            w.write(ex.SerializeToString())
    schema.DatasetInfo(
        class_names=["a", "b"],
        tile_px=tile_px,
        counts={"train": {"a": 3, "b": 3}},
        shards={"train": 1},
        lr_factor=factor,
    ).write(out_dir)
    return out_dir


def test_pyramid_lr_is_the_aligned_stored_tile_with_the_same_augmentation(tmp_path):
    d = _write_pyramid_shards(str(tmp_path / "pyr"))
    b = _first(
        PipelineConfig(d, batch_size=6, hr_px=24, factor=2, lr_method="pyramid", augment="flips")
    )
    assert b["lr"].shape == (6, 12, 12, 3)
    # The stored LR tile is the rounded block mean of the tile, so it matches the augmented hr
    # crop's block mean to within uint8 rounding only when crop and flips/rotations agree.
    np.testing.assert_allclose(b["lr"], block_mean(b["hr"], 2), atol=0.6 / 255 + 1e-6)


def test_pyramid_without_stored_lr_is_a_clear_error(tiny_shards):
    with pytest.raises(ValueError, match="pyramid"):
        make_dataset(PipelineConfig(tiny_shards, lr_method="pyramid"))


def test_hr_larger_than_tile_is_a_clear_error(tiny_shards):
    with pytest.raises(ValueError, match="hr_px"):
        make_dataset(PipelineConfig(tiny_shards, hr_px=64))


@pytest.mark.parametrize(
    "shape,size", [((2, 32, 32, 3), 4), ((24, 24, 3), 8), ((2, 112, 112, 3), 14)]
)
def test_resize_portable_is_resize(shape, size):
    # The exported TFLite graph's area resize (average pooling) gives resize()'s numbers, and the
    # NumPy block mean; a factor that does not divide the side falls back to resize() itself.
    x = tf.constant(np.random.default_rng(0).random(shape, np.float32))
    got = views.resize_portable(x, size).numpy()
    np.testing.assert_allclose(got, views.resize(x, size).numpy(), atol=1e-6)
    np.testing.assert_allclose(got, block_mean(x.numpy(), shape[-2] // size), atol=1e-6)
    odd = views.resize_portable(x, size + 1).numpy()
    np.testing.assert_array_equal(odd, views.resize(x, size + 1).numpy())
    bicubic = views.resize_portable(x, size, "bicubic").numpy()
    np.testing.assert_array_equal(bicubic, views.resize(x, size, "bicubic").numpy())
