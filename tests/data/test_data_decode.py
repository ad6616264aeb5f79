"""Reading shards: decoding, and corrupt data giving a clear error naming the shard (or a skip)."""

import os

import numpy as np
import pytest
import tensorflow as tf
from support import copy_data, count_tiles, records, rewrite

from kd_histo import schema
from kd_histo.data import decode
from kd_histo.data.pipeline import PipelineConfig, make_dataset

pytestmark = pytest.mark.reliability


def test_decode_record_round_trips_a_tile():
    tile = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    ex = schema.make_example(
        tf.io.encode_png(tile).numpy(), 4, 4, label=2, slide_id="s", x=7, y=9, source="a.png"
    )
    out = decode.decode_record(tf.constant(ex.SerializeToString()), tile_px=4)
    np.testing.assert_array_equal(out["image"].numpy(), tile)
    assert (int(out["label"]), out["slide_id"].numpy(), int(out["x"]), int(out["y"])) == (
        2,
        b"s",
        7,
        9,
    )
    assert out["label"].dtype == tf.int32


@pytest.mark.parametrize("bad", ["garbage_image", "wrong_size", "not_an_example"])
def test_corrupt_record_names_the_shard_or_is_skipped(tiny_shards, tmp_path, bad):
    d = copy_data(tiny_shards, tmp_path)
    shard = schema.shard_paths(d, "val")[1]
    recs = records(shard)
    n_total = sum(len(records(p)) for p in schema.shard_paths(d, "val"))
    junk = {
        "garbage_image": schema.make_example(b"not a png", 32, 32).SerializeToString(),
        "wrong_size": schema.make_example(
            tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy(), 8, 8
        ).SerializeToString(),
        "not_an_example": b"\x00\x01 definitely not a protobuf",
    }[bad]
    rewrite(shard, recs[:1] + [junk] + recs[1:])
    with pytest.raises(tf.errors.InvalidArgumentError, match=os.path.basename(shard)) as err:
        count_tiles(d)
    assert "corrupt record" in str(err.value) and "skip_corrupt" in str(err.value)
    assert count_tiles(d, skip_corrupt=True) == n_total


@pytest.mark.parametrize("damage", ["bit_flip", "truncated"])
def test_damaged_shard_file_names_the_shard_or_is_read_up_to_the_damage(
    tiny_shards, tmp_path, damage
):
    d = copy_data(tiny_shards, tmp_path)
    shard = schema.shard_paths(d, "val")[0]
    with open(shard, "rb") as f:
        data = bytearray(f.read())
    if damage == "bit_flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) - 40]
    with open(shard, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(tf.errors.InvalidArgumentError, match=os.path.basename(shard)) as err:
        count_tiles(d)
    assert "damaged" in str(err.value)
    n_other = len(records(schema.shard_paths(d, "val")[1]))
    n_kept = count_tiles(d, skip_corrupt=True)
    assert n_other <= n_kept < n_other + 4  # the damaged shard is read up to the damage


def test_corrupt_record_in_training_fails_too_not_hangs(tiny_shards, tmp_path):
    d = copy_data(tiny_shards, tmp_path)
    shard = schema.shard_paths(d, "train")[0]
    rewrite(shard, [b"junk"] + records(shard))
    with pytest.raises(tf.errors.InvalidArgumentError, match=os.path.basename(shard)):
        for _ in make_dataset(PipelineConfig(d, batch_size=4, cycle_length=1)):
            pass
