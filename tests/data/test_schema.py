"""The schema round-trips, rejects what it must, and reads the fixture's shards."""

import numpy as np
import pytest
import tensorflow as tf

from kd_histo import schema


def test_example_round_trip_graph_and_numpy():
    img = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    png = tf.io.encode_png(img).numpy()
    ex = schema.make_example(png, 4, 5, label=2, slide_id="s1", x=7, y=9, mpp=0.5, source="a.png")
    raw = ex.SerializeToString()
    parsed = schema.parse_example(tf.constant(raw))
    assert int(parsed["label"]) == 2 and parsed["slide_id"].numpy() == b"s1"
    assert int(parsed["x"]) == 7 and int(parsed["y"]) == 9
    np.testing.assert_array_equal(tf.io.decode_png(parsed["image"]).numpy(), img)
    eager = schema.parse_example_numpy(raw)
    assert (
        eager["label"] == 2
        and eager["lr_image"] == b""
        and eager["schema_version"] == schema.SCHEMA_VERSION
    )


def test_unlabeled_default_and_bad_label():
    ex = schema.make_example(b"x", 1, 1)
    assert schema.parse_example_numpy(ex.SerializeToString())["label"] == schema.UNLABELED
    with pytest.raises(schema.SchemaError, match="label"):
        schema.make_example(b"x", 1, 1, label=-2)


@pytest.mark.reliability
def test_other_schema_version_is_refused():
    ex = schema.make_example(b"x", 1, 1)
    ex.features.feature["schema_version"].int64_list.value[0] = 0
    with pytest.raises(schema.SchemaError, match="schema_version"):
        schema.parse_example_numpy(ex.SerializeToString())
    with pytest.raises(tf.errors.InvalidArgumentError, match="schema_version"):
        schema.parse_example(tf.constant(ex.SerializeToString()))


def test_shard_names():
    assert schema.shard_name("train", 3, 16) == "train-00003-of-00016.tfrecord"
    assert schema.shard_name("val", 0, 1, "GZIP").endswith(".tfrecord.gz")
    assert schema.parse_shard_name("/a/b/test-00001-of-00004.tfrecord.gz") == ("test", 1, 4)
    with pytest.raises(schema.SchemaError):
        schema.shard_name("train", 16, 16)
    with pytest.raises(schema.SchemaError):
        schema.parse_shard_name("train.tfrecord")


def test_dataset_info_round_trip_and_errors(tiny_shards, tmp_path):
    info = schema.DatasetInfo.read(tiny_shards)
    assert info.num_classes == 4 and info.tile_px == 32
    assert info.num_examples("train") == sum(
        1 for p in schema.shard_paths(tiny_shards, "train") for _ in tf.data.TFRecordDataset(p)
    )
    info.write(str(tmp_path))
    assert schema.DatasetInfo.read(str(tmp_path)) == info
    with pytest.raises(FileNotFoundError, match="kd-histo-convert"):
        schema.DatasetInfo.read(str(tmp_path / "nowhere"))
    (tmp_path / "dataset.json").write_text('{"schema_version": 0}')
    with pytest.raises(schema.SchemaError, match="reconvert"):
        schema.DatasetInfo.read(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="'val' shards"):
        schema.shard_paths(str(tmp_path), "val")
