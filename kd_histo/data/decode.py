"""Reading shards: TFRecord bytes -> decoded uint8 tiles with their metadata, inside tf.data.

Records are parsed with the shared schema (:func:`kd_histo.schema.parse_example`) and the image
(PNG or JPEG) is decoded to uint8 RGB of the data set's tile size. Decoding to uint8 (not float)
keeps a cache of decoded tiles four times smaller.

Corrupt data never hangs and never passes silently. Each shard is read on its own:
- a record that does not parse or decode (bad bytes, wrong tile size, other schema version) is
  reported as ``corrupt record <i> in shard <path>``;
- a damaged file (bad CRC, truncated) is reported as ``shard <path> is damaged after record <n>``
  (uncompressed shards; a GZIP shard's damage surfaces as TensorFlow's own DataLossError);
- with ``skip_corrupt=True`` both are skipped instead (tf.data logs a warning per skip; a damaged
  file is read up to the damage).

This module does not crop, augment or batch (see :mod:`kd_histo.data.views`, ``pipeline``).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from kd_histo import schema

_ENVELOPE = 16  # TFRecord framing bytes per record: length (8) + length CRC (4) + data CRC (4)


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
    """
    if not paths:
        raise ValueError("read_shards needs at least one shard path")
    calls = tf.data.AUTOTUNE if parallel else None
    sizes = [tf.io.gfile.stat(p).length for p in paths]
    files = tf.data.Dataset.from_tensor_slices((list(paths), tf.constant(sizes, tf.int64)))
    if shuffle_seed is not None:
        # One file order per seed, the same on every pass: an order that changed from pass to
        # pass would make ``cache()`` (which freezes the first pass) change the stream. The
        # per-epoch randomness comes from the element shuffle after the cache.
        files = files.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=False)
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
        gap = tf.debugging.Assert(
            tf.equal(index, expected),
            [
                "kd_histo: corrupt record",
                expected,
                "in shard",
                path,
                "(does not parse, or does not decode to the data set's tile size);",
                "re-convert it or set skip_corrupt",
            ],
        )
        damaged = tf.debugging.Assert(
            tf.logical_or(tf.logical_not(is_end), tf.equal(nbytes, size)),
            [
                "kd_histo: shard",
                path,
                "is damaged after record",
                index,
                "(bad CRC or truncated file); re-convert it or set skip_corrupt",
            ],
        )
        with tf.control_dependencies([gap, damaged]):
            return index + 1, (is_end, tf.nest.map_structure(tf.identity, example))

    checked = decoded.scan(tf.constant(0, tf.int64), check)
    return checked.filter(lambda is_end, ex: tf.logical_not(is_end)).map(lambda is_end, ex: ex)
