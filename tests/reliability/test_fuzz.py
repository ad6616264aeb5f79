"""Fuzzing (Hypothesis) of the record parser and the manifest reader: random bytes, random
Examples and random CSV rows end in a result or in the project's own error, never in another
exception, a hang or a crash.

The project's errors: :class:`kd_histo.schema.SchemaError` (records, shards), a TensorFlow
``InvalidArgumentError`` whose message starts with "kd_histo:" (records read inside tf.data, where
only TensorFlow errors can travel) and :class:`kd_histo.convert.ManifestError` (manifests).
Runs are derandomized so CI is reproducible; raise ``max_examples`` locally to search longer.
"""

import csv
import io
import os

import hypothesis.strategies as st
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, example, given, settings

from kd_histo import schema
from kd_histo.convert.manifest import Entry, ManifestError, read_manifest
from kd_histo.data import decode

pytestmark = pytest.mark.reliability

FUZZ = settings(
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_VALID = schema.make_example(
    tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy(), 8, 8, label=1
).SerializeToString()


def _parses_or_schema_error(data: bytes) -> None:
    try:
        out = schema.parse_example_numpy(data)
    except schema.SchemaError:
        return
    assert set(out) == set(schema.FEATURES)
    assert out["schema_version"] == schema.SCHEMA_VERSION


@settings(FUZZ, max_examples=400)
@given(st.binary(max_size=300))
@example(b"")
@example(b"\x00")
@example(b"junk")
@example(_VALID)
@example(_VALID[:-3])
def test_record_parser_on_random_bytes(data):
    _parses_or_schema_error(data)


def _feature(kind, values):
    f = tf.train.Feature()
    if kind:
        getattr(f, kind).value.extend(values)
    return f


_FEATURE = st.one_of(
    st.builds(_feature, st.just("bytes_list"), st.lists(st.binary(max_size=16), max_size=3)),
    st.builds(
        _feature, st.just("int64_list"), st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3)
    ),
    st.builds(_feature, st.just("float_list"), st.lists(st.floats(width=32), max_size=3)),
    st.builds(_feature, st.none(), st.just([])),
)


@settings(FUZZ, max_examples=300)
@given(st.dictionaries(st.sampled_from([*schema.FEATURES, "extra", ""]), _FEATURE, max_size=16))
def test_record_parser_on_random_examples(features):
    ex = tf.train.Example()
    for name, feature in features.items():
        ex.features.feature[name].CopyFrom(feature)
    _parses_or_schema_error(ex.SerializeToString())


@settings(FUZZ, max_examples=20)
@given(
    st.lists(st.binary(max_size=64), max_size=3),
    st.booleans(),
    st.binary(min_size=1, max_size=200),
)
def test_shard_reader_on_random_records_and_random_files(tmp_path, records, framed, raw):
    """Random records in a well-framed shard, or a file of random bytes: decode.read_shards
    (what training and evaluation read through) ends in the project's errors only."""
    path = str(tmp_path / "train-00000-of-00001.tfrecord")
    if framed:
        with tf.io.TFRecordWriter(path) as w:
            for r in [*records, _VALID]:  # the valid record keeps the shard from being empty
                w.write(r)
    else:
        with open(path, "wb") as f:
            f.write(raw)
    try:
        n = sum(1 for _ in decode.read_shards([path], tile_px=8))
    except schema.SchemaError:
        return
    except tf.errors.InvalidArgumentError as e:
        assert e.message.split("assertion failed: [", 1)[-1].startswith("kd_histo: "), e.message
        return
    assert framed and n == len(records) + 1  # only a shard of valid records reads through


_CELL = st.text(max_size=12) | st.sampled_from(["a.png", "../x.png", "/abs/y.png", "", ",", '"'])


@settings(FUZZ, max_examples=300)
@given(
    st.sampled_from(
        [["path", "label"], ["path", "label", "slide_id", "patient_id", "split"], ["label"], []]
    ),
    st.lists(st.lists(_CELL, max_size=7), max_size=6),
    st.booleans(),
)
@example(["path", "label"], [["a.png", "x", "surplus"]], False)
@example(["path", "label"], [["a\x00.png", "x"]], True)
def test_manifest_reader_on_random_csv_rows(tmp_path, header, rows, with_root):
    path = str(tmp_path / "root" / "m.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    if header:
        w.writerow(header)
    w.writerows(rows)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())
    _entries_or_manifest_error(path, str(tmp_path / "root") if with_root else None)


@settings(FUZZ, max_examples=200)
@given(st.binary(max_size=200))
@example(b"path,label\n\xff\xfe.png,x\n")
@example(b"path,label\n" + b"x" * 140_000 + b",y\n")  # a field over csv's size limit
def test_manifest_reader_on_random_bytes(tmp_path, data):
    path = str(tmp_path / "m.csv")
    with open(path, "wb") as f:
        f.write(b"path,label\n" + data)
    _entries_or_manifest_error(path, str(tmp_path))


def _entries_or_manifest_error(path, root):
    try:
        entries = read_manifest(path, root=root)
    except ManifestError as e:
        assert "\n" not in str(e)  # one line, as the CLI prints it
        return
    assert entries and all(isinstance(e, Entry) and os.path.isabs(e.path) for e in entries)
