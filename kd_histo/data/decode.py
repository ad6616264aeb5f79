"""Reading shards: TFRecord bytes -> decoded uint8 tiles with their metadata, inside tf.data.

Records are parsed with the shared schema (:func:`kd_histo.schema.parse_example`) and the image
(PNG or JPEG) is decoded to uint8 RGB of the data set's tile size. Decoding to uint8 (not float)
keeps a cache of decoded tiles four times smaller.

Corrupt data never hangs and never passes silently. Each shard is read on its own:
- an empty shard file, or one whose first record is of another schema version, is refused when
  the dataset is built (:class:`kd_histo.schema.SchemaError`, naming the shard);
- a record that does not parse or decode (bad bytes, wrong tile size, other schema version) is
  reported as ``corrupt record <i> in shard <path>``;
- a damaged file (bad CRC, truncated) is reported as ``shard <path> is damaged after record <n>``
  (uncompressed shards; a GZIP shard's damage surfaces as TensorFlow's own DataLossError);
- with ``skip_corrupt=True`` both are skipped instead (tf.data logs a warning per skip; a damaged
  file is read up to the damage).

This module does not crop, augment or batch (see :mod:`kd_histo.data.views`, ``pipeline``).
"""

from __future__ import annotations

import struct

import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError

from kd_histo import schema

_ENVELOPE = 16  # TFRecord framing bytes per record: length (8) + length CRC (4) + data CRC (4)


def count_records(path: str) -> int:
    """Records in an uncompressed TFRecord file, from its framing alone (no record is read).

    Raises:
      SchemaError: the framing does not end exactly at the end of the file (truncated, or
        bytes appended or overwritten).
    """
    size = tf.io.gfile.stat(path).length
    n = offset = 0
    with tf.io.gfile.GFile(path, "rb") as f:
        while offset < size:
            head = f.read(8)
            if len(head) < 8:
                break
            offset += _ENVELOPE + struct.unpack("<Q", head)[0]
            if offset > size:
                break
            f.seek(offset)
            n += 1
    if offset != size:
        raise schema.SchemaError(
            f"shard {path} is damaged after record {n} (its records do not end at the file's "
            f"{size} bytes: truncated or overwritten); re-convert the data"
        )
    return n


def first_record_version(path: str, compression: str = "") -> int | None:
    """``schema_version`` of a shard's first record (versions start at 1; a record with an "image"
    but no "schema_version" predates them and counts as 0), or None when it cannot tell (empty or
    damaged file, not an Example, a wrong-typed version): the record checks deal with those."""
    try:
        ds = tf.data.TFRecordDataset(path, compression_type=compression or None)
        first = next(iter(ds.take(1)), None)
    except tf.errors.OpError:
        return None
    if first is None:
        return None
    try:
        feature = tf.train.Example.FromString(first.numpy()).features.feature
    except DecodeError:
        return None
    if "schema_version" in feature:
        values = feature["schema_version"].int64_list.value
        return int(values[0]) if len(values) == 1 else None
    return 0 if "image" in feature else None


def check_shard_files(paths: list[str], compression: str = "", allow_empty: bool = False) -> None:
    """Refuses empty shard files and shards of another schema version, naming the shard.

    Only the first record of each shard is read: a shard is written by one version of the
    converter, and the records after the first are checked as they are read.
    """
    for path in paths:
        if not allow_empty and tf.io.gfile.stat(path).length == 0:
            raise schema.SchemaError(
                f"shard {path} is empty (0 bytes; kd-histo-convert never writes an empty shard): "
                "re-convert the data, or pass --skip_corrupt"
            )
        version = first_record_version(path, compression)
        if version is not None and version != schema.SCHEMA_VERSION:
            old = " (from before versioned records: an older kd_histo)" if version == 0 else ""
            raise schema.SchemaError(
                f"shard {path} holds records of schema_version {version}{old}, this kd_histo "
                f"reads {schema.SCHEMA_VERSION}; reconvert the data with kd-histo-convert"
            )


def decode_record(serialized: tf.Tensor, tile_px: int, lr_tile_px: int = 0) -> dict[str, tf.Tensor]:
    """Parses and decodes one record (graph-safe).

    Args:
      serialized: scalar string, one serialised ``tf.train.Example``.
      tile_px: expected side of the stored tile; any other size is an error.
      lr_tile_px: when > 0, also decode the stored pyramid ``lr_image`` of this side.

    Returns:
      {"image": uint8 [tile_px, tile_px, 3], ["lr_image": uint8 [lr_tile_px, lr_tile_px, 3],]
       "label": int32, "slide_id": string, "x": int64, "y": int64, "source": string}.
    """
    parsed = schema.parse_example(serialized)

    def _decode(data, px):
        img = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
        return tf.ensure_shape(img, [px, px, 3])

    out = {
        "image": _decode(parsed["image"], tile_px),
        "label": tf.cast(parsed["label"], tf.int32),
        "slide_id": parsed["slide_id"],
        "x": parsed["x"],
        "y": parsed["y"],
        "source": parsed["source"],
    }
    if lr_tile_px > 0:
        out["lr_image"] = _decode(parsed["lr_image"], lr_tile_px)
    return out


def _end_marker(tile_px: int, lr_tile_px: int) -> bytes:
    """A valid record appended after each shard's last one, so the checks run at the end."""
    png = tf.io.encode_png(np.zeros([tile_px, tile_px, 3], np.uint8)).numpy()
    lr = (
        tf.io.encode_png(np.zeros([max(lr_tile_px, 1)] * 2 + [3], np.uint8)).numpy()
        if lr_tile_px
        else b""
    )
    return schema.make_example(
        png, tile_px, tile_px, lr_image=lr, source="__end__"
    ).SerializeToString()


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed % 2**64)  # any int, negative ones included


def read_shards(
    paths: list[str],
    *,
    tile_px: int,
    lr_tile_px: int = 0,
    compression: str = "",
    skip_corrupt: bool = False,
    cycle_length: int = 1,
    shuffle_seed: int | None = None,
    parallel: bool = True,
) -> tf.data.Dataset:
    """Dataset of decoded examples (:func:`decode_record`) from a list of shard files.

    Args:
      paths: shard files (``kd_histo.schema.shard_paths``).
      tile_px: side of the stored tiles (``dataset.json`` ``tile_px``).
      lr_tile_px: side of the stored pyramid LR tiles to decode too (0 = do not decode them).
      compression: "" or "GZIP".
      skip_corrupt: skip corrupt records / damaged tails instead of failing.
      cycle_length: shards read at once (interleaved record by record); 1 = file order.
      shuffle_seed: shuffle the order of the shard files with this seed, once: every pass reads
        them in that order (None = sorted order).
      parallel: decode with parallel calls (False: one thread, for tests and debugging).

    Returns:
      A deterministic ``tf.data.Dataset`` of example dicts.

    Raises:
      SchemaError: a shard file is empty (unless ``skip_corrupt``) or of another schema version.
    """
    if not paths:
        raise ValueError("read_shards needs at least one shard path")
    check_shard_files(paths, compression, allow_empty=skip_corrupt)
    calls = tf.data.AUTOTUNE if parallel else None
    paths = list(paths)
    if shuffle_seed is not None:
        # One file order per seed, the same on every pass: an order that changed from pass to
        # pass would make ``cache()`` (which freezes the first pass) change the stream. The
        # per-epoch randomness comes from the element shuffle after the cache. Drawn by NumPy,
        # the order depends on this seed alone, not on TensorFlow's global seed.
        paths = [paths[i] for i in _rng(shuffle_seed).permutation(len(paths))]
    sizes = [tf.io.gfile.stat(p).length for p in paths]
    files = tf.data.Dataset.from_tensor_slices((paths, tf.constant(sizes, tf.int64)))
    end = _end_marker(tile_px, lr_tile_px)
    check_bytes = compression.upper() != "GZIP"
    compression_type = compression or None

    def decode(record):
        return decode_record(record, tile_px, lr_tile_px)

    def one_shard(path, size):
        records = tf.data.TFRecordDataset(path, compression_type=compression_type)
        if skip_corrupt:
            return records.map(decode, num_parallel_calls=calls, deterministic=True).ignore_errors(
                log_warning=True
            )
        if not check_bytes:
            return records.map(decode, num_parallel_calls=calls, deterministic=True)
        return _checked_shard(records, path, size, end, decode, calls)

    if cycle_length == 1:  # file order, one shard after another
        return files.interleave(one_shard, cycle_length=1, block_length=1)
    return files.interleave(
        one_shard,
        cycle_length=cycle_length,
        block_length=1,
        num_parallel_calls=calls,
        deterministic=True,
    )


def _checked_shard(records, path, size, end, decode, calls):
    """Reads one uncompressed shard, failing with the shard's name on any corrupt record.

    Records are numbered before decoding; decoding failures are dropped by ``ignore_errors`` and
    then detected as a gap in the numbering. A damaged file ends the record stream early, which
    the byte count (records + framing == file size) detects at the end marker.
    """
    tagged = records.ignore_errors().map(lambda r: (r, False))
    tagged = tagged.concatenate(tf.data.Dataset.from_tensors((tf.constant(end), True)))

    def count_bytes(total, elem):
        record, is_end = elem
        n = tf.where(
            is_end,
            tf.constant(0, tf.int64),
            tf.cast(tf.strings.length(record), tf.int64) + _ENVELOPE,
        )
        return total + n, (record, is_end, total + n)

    numbered = tagged.scan(tf.constant(0, tf.int64), count_bytes).enumerate()
    decoded = numbered.map(
        lambda i, e: (i, e[1], e[2], decode(e[0])), num_parallel_calls=calls, deterministic=True
    ).ignore_errors()

    def check(expected, elem):
        index, is_end, nbytes, example = elem
        # One joined string per message, so the error reads as one sentence.
        gap = tf.debugging.Assert(
            tf.equal(index, expected),
            [
                tf.strings.join(
                    [
                        "kd_histo: corrupt record ",
                        tf.strings.as_string(expected),
                        " in shard ",
                        path,
                        " (does not parse as this schema, or does not decode to the tile size of "
                        "dataset.json); re-convert it or pass --skip_corrupt",
                    ]
                )
            ],
        )
        damaged = tf.debugging.Assert(
            tf.logical_or(tf.logical_not(is_end), tf.equal(nbytes, size)),
            [
                tf.strings.join(
                    [
                        "kd_histo: shard ",
                        path,
                        " is damaged after record ",
                        tf.strings.as_string(index),
                        " (bad CRC or truncated file); re-convert it or pass --skip_corrupt",
                    ]
                )
            ],
        )
        with tf.control_dependencies([gap, damaged]):
            return index + 1, (is_end, tf.nest.map_structure(tf.identity, example))

    checked = decoded.scan(tf.constant(0, tf.int64), check)
    return checked.filter(lambda is_end, ex: tf.logical_not(is_end)).map(lambda is_end, ex: ex)
