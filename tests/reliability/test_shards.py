"""Bad shards: a record with a missing or wrong-typed feature, an older schema version, an empty
shard, a dataset.json that disagrees with its shards. Each is named in the error; with
``skip_corrupt`` only the bad record is dropped.

Also proven elsewhere (marked ``reliability``): tests/data/test_data_decode.py (a truncated or
bit-flipped TFRecord file, garbage records, a wrong tile size, in evaluation and in training) and
tests/data/test_schema.py (``test_other_schema_version_is_refused``: one record, both parsers).
"""

import json
import os
import shutil

import pytest
import tensorflow as tf
from support import copy_data, count_tiles, records, rewrite

from kd_histo import schema
from kd_histo.training import preflight, train

from .helpers import tiny_config

pytestmark = pytest.mark.reliability


def _corrupt_record(index: int, shard: str) -> str:
    """The start of the error that names a record the pipeline cannot read."""
    return (
        f"[kd_histo: corrupt record {index} in shard {shard} (does not parse as this schema, or "
        "does not "
        "decode to the tile size of dataset.json)"
    )


def _tweak(record: bytes, edit) -> bytes:
    ex = tf.train.Example.FromString(record)
    edit(ex.features.feature)
    return ex.SerializeToString()


def _drop(name):
    return lambda f: f.pop(name)


def _as_bytes(name):
    def edit(f):
        f[name].Clear()
        f[name].bytes_list.value.append(b"7")

    return edit


def _as_int(name):
    def edit(f):
        f[name].Clear()
        f[name].int64_list.value.append(7)

    return edit


@pytest.mark.parametrize(
    "edit,message",
    [
        (_drop("image"), "record lacks the required feature 'image'"),
        (_drop("height"), "record lacks the required feature 'height'"),
        (_as_bytes("label"), "feature 'label' is bytes_list, expected int64_list"),
        (_as_int("image"), "feature 'image' is int64_list, expected bytes_list"),
    ],
    ids=["no_image", "no_height", "label_as_bytes", "image_as_int64"],
)
def test_record_with_a_missing_or_wrong_typed_feature(tiny_shards, tmp_path, edit, message):
    d = copy_data(tiny_shards, tmp_path)
    shard = schema.shard_paths(d, "val")[1]
    recs = records(shard)
    bad = _tweak(recs[1], edit)
    with pytest.raises(schema.SchemaError, match=f"^{message}$"):
        schema.parse_example_numpy(bad)
    rewrite(shard, recs[:1] + [bad] + recs[2:])
    n_total = sum(len(records(p)) for p in schema.shard_paths(d, "val"))
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        count_tiles(d)
    assert _corrupt_record(1, shard) + "; re-convert it or pass --skip_corrupt]" in str(err.value)
    assert count_tiles(d, skip_corrupt=True) == n_total - 1  # only the bad record is dropped


@pytest.mark.parametrize("version", [0, None, 2])
def test_shard_of_another_schema_version_is_refused_naming_it(tiny_shards, tmp_path, version):
    d = copy_data(tiny_shards, tmp_path)
    shard = schema.shard_paths(d, "val")[0]

    def edit(f):
        if version is None:  # written before records carried a version
            f.pop("schema_version")
        else:
            f["schema_version"].int64_list.value[0] = version

    rewrite(shard, [_tweak(r, edit) for r in records(shard)])
    shown = 0 if version is None else version
    old = " (from before versioned records: an older kd_histo)" if shown == 0 else ""
    expected = (
        f"shard {shard} holds records of schema_version {shown}{old}, this kd_histo reads "
        f"{schema.SCHEMA_VERSION}; reconvert the data with kd-histo-convert"
    )
    for skip_corrupt in (False, True):  # another version is not "corrupt": never skipped silently
        with pytest.raises(schema.SchemaError) as err:
            count_tiles(d, skip_corrupt=skip_corrupt)
        assert str(err.value) == expected


def test_dataset_json_of_an_older_schema_version(tiny_shards, tmp_path):
    d = copy_data(tiny_shards, tmp_path)
    with open(os.path.join(d, "dataset.json")) as f:
        info = json.load(f)
    del info["schema_version"]  # written before dataset.json had one
    with open(os.path.join(d, "dataset.json"), "w") as f:
        json.dump(info, f)
    with pytest.raises(schema.SchemaError) as err:
        count_tiles(d)
    assert str(err.value) == (
        f"dataset.json has schema_version None, this kd_histo reads {schema.SCHEMA_VERSION}; "
        "reconvert the data with kd-histo-convert"
    )


def test_empty_shard_is_refused_or_skipped(tiny_shards, tmp_path):
    d = copy_data(tiny_shards, tmp_path)
    empty, other = schema.shard_paths(d, "val")
    n_other = len(records(other))
    open(empty, "wb").close()
    with pytest.raises(schema.SchemaError) as err:
        count_tiles(d)
    assert str(err.value) == (
        f"shard {empty} is empty (0 bytes; kd-histo-convert never writes an empty shard): "
        "re-convert the data, or pass --skip_corrupt"
    )
    assert count_tiles(d, skip_corrupt=True) == n_other


def _edit_info(d, **changes):
    with open(os.path.join(d, "dataset.json")) as f:
        info = json.load(f)
    for key, value in changes.items():
        if callable(value):
            value(info[key])
        else:
            info[key] = value
    with open(os.path.join(d, "dataset.json"), "w") as f:
        json.dump(info, f)


def _inc(split, cls):
    def edit(counts):
        counts[split][cls] += 1

    return edit


@pytest.mark.parametrize(
    "case", ["count", "missing_shard", "extra_shard", "empty_shard", "truncated", "nan_mean"]
)
def test_training_refuses_a_dataset_json_that_disagrees_with_the_shards(
    tiny_shards, tmp_path, case
):
    d = copy_data(tiny_shards, tmp_path)
    train_shards = schema.shard_paths(d, "train")
    n_train = sum(len(records(p)) for p in train_shards)
    if case == "count":
        _edit_info(d, counts=_inc("train", "tumour"))
        message = (
            f"{d}: dataset.json counts {n_train + 1} 'train' records but its shards hold "
            f"{n_train}; "
            "dataset.json and the shards disagree: reconvert the data"
        )
    elif case == "missing_shard":
        os.remove(train_shards[1])
        message = (
            f"{d}: dataset.json lists 2 'train' shards but the folder differs; missing "
            f"{os.path.basename(train_shards[1])}: restore the files or reconvert the data"
        )
    elif case == "extra_shard":
        shutil.copy(train_shards[0], os.path.join(d, "train-00000-of-00003.tfrecord"))
        message = (
            f"{d}: dataset.json lists 2 'train' shards but the folder differs; not listed "
            "train-00000-of-00003.tfrecord: restore the files or reconvert the data"
        )
    elif case == "empty_shard":
        open(train_shards[0], "wb").close()
        message = f"shard {train_shards[0]} holds no records; reconvert the data"
    elif case == "truncated":
        size = os.path.getsize(train_shards[0])
        with open(train_shards[0], "r+b") as f:
            f.truncate(size - 100)
        message = f"shard {train_shards[0]} is damaged after record "
    else:
        _edit_info(d, mean=[float("nan"), 0.5, 0.5])
        message = (
            "dataset.json mean/std must be 3 finite values each, std > 0; got mean [nan, 0.5, 0.5]"
        )
    with pytest.raises(preflight.PreflightError) as err:
        train.train(tiny_config(d, tmp_path / "run", steps_per_epoch=1))
    assert str(err.value).startswith(message), str(err.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_dataset_json_with_another_tile_size_names_the_shard(tiny_shards, tmp_path):
    d = copy_data(tiny_shards, tmp_path)
    _edit_info(d, tile_px=24)
    first = schema.shard_paths(d, "val")[0]
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        count_tiles(d)
    assert _corrupt_record(0, first) in str(err.value)
