"""The one TFRecord schema of kd_histo: writer and reader both import this module.

A record is one tile. The image is stored encoded (PNG by default, JPEG optional) so shards stay
small and decoding happens inside the tf.data graph. Optional fields (slide/patient ids,
coordinates, the aligned low-resolution tile read from a slide pyramid) have defaults, so a record
written without them still parses.

Shards are named ``<split>-00000-of-00016.tfrecord`` (``.tfrecord.gz`` when GZIP-compressed) and sit
beside ``dataset.json``, described by :class:`DatasetInfo`.

This module does not decode images, augment, or build pipelines (see ``kd_histo.data``), and does
not walk folders or slides (see ``kd_histo.convert``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import tensorflow as tf
from google.protobuf.message import DecodeError

from kd_histo.atomic import replacing

SCHEMA_VERSION = 1
UNLABELED = -1
DATASET_JSON = "dataset.json"

# name -> (dtype, default). A default of None means required.
_FIELDS: dict[str, tuple[tf.DType, Any]] = {
    "image": (tf.string, None),
    "height": (tf.int64, None),
    "width": (tf.int64, None),
    "label": (tf.int64, UNLABELED),
    "slide_id": (tf.string, ""),
    "patient_id": (tf.string, ""),
    "x": (tf.int64, 0),
    "y": (tf.int64, 0),
    "mpp": (tf.float32, 0.0),
    "source": (tf.string, ""),
    "lr_image": (tf.string, ""),
    "lr_factor": (tf.float32, 0.0),
    "schema_version": (tf.int64, None),
}

FEATURES: dict[str, tf.io.FixedLenFeature] = {
    name: tf.io.FixedLenFeature([], dtype, default_value=default)
    for name, (dtype, default) in _FIELDS.items()
}

_SHARD_RE = re.compile(
    r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.tfrecord(\.gz)?$"
)


class SchemaError(ValueError):
    """A record or a dataset description does not match this schema version."""


def _bytes(value: bytes | str) -> tf.train.Feature:
    if isinstance(value, str):
        value = value.encode("utf-8")
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def _float(value: float) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(value)]))


def make_example(
    image: bytes,
    height: int,
    width: int,
    *,
    label: int = UNLABELED,
    slide_id: str = "",
    patient_id: str = "",
    x: int = 0,
    y: int = 0,
    mpp: float = 0.0,
    source: str = "",
    lr_image: bytes = b"",
    lr_factor: float = 0.0,
) -> tf.train.Example:
    """Builds one tile record.

    Args:
      image: encoded image bytes (PNG or JPEG), RGB, ``height`` x ``width``.
      height: pixel height of the decoded image.
      width: pixel width of the decoded image.
      label: class index, or ``UNLABELED`` (-1) for tiles without a label.
      slide_id: the slide the tile comes from (tile folders: one id per image by default).
      patient_id: the patient; splits never put one patient in two splits.
      x: left edge of the tile in level-0 pixels of its slide (0 for plain tiles).
      y: top edge of the tile in level-0 pixels.
      mpp: microns per pixel of ``image`` (0 when unknown).
      source: the path the tile was read from.
      lr_image: optional encoded low-resolution view of the same area (from a slide pyramid).
      lr_factor: the downsampling factor of ``lr_image`` relative to ``image``.

    Returns:
      A ``tf.train.Example``; serialise it with ``SerializeToString()``.
    """
    if label < UNLABELED:
        raise SchemaError(f"label must be >= -1 (-1 = unlabeled), got {label}")
    if height <= 0 or width <= 0:
        raise SchemaError(f"image size must be positive, got {height}x{width}")
    feature = {
        "image": _bytes(image),
        "height": _int(height),
        "width": _int(width),
        "label": _int(label),
        "slide_id": _bytes(slide_id),
        "patient_id": _bytes(patient_id),
        "x": _int(x),
        "y": _int(y),
        "mpp": _float(mpp),
        "source": _bytes(source),
        "lr_image": _bytes(lr_image),
        "lr_factor": _float(lr_factor),
        "schema_version": _int(SCHEMA_VERSION),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses one serialised record into a dict of scalar tensors (graph-safe, for tf.data).

    The image stays encoded; ``kd_histo.data`` decodes it. A record from another schema version
    fails with an ``InvalidArgumentError`` that names the versions.
    """
    parsed = tf.io.parse_single_example(serialized, FEATURES)
    check = tf.debugging.assert_equal(
        parsed["schema_version"],
        tf.constant(SCHEMA_VERSION, tf.int64),
        message=f"kd_histo: record schema_version differs from this reader's {SCHEMA_VERSION}; "
        "reconvert the data with kd-histo-convert",
    )
    with tf.control_dependencies([check]):
        parsed["label"] = tf.identity(parsed["label"])
    return parsed


def parse_example_numpy(serialized: bytes) -> dict[str, Any]:
    """Parses one record eagerly into Python values (tools, tests, inspection).

    Raises:
      SchemaError: the bytes are not a ``tf.train.Example`` of this schema version.
    """
    try:
        example = tf.train.Example.FromString(serialized)
    except DecodeError:
        raise SchemaError(
            f"record is not a tf.train.Example ({len(serialized)} bytes that do not parse)"
        ) from None
    out: dict[str, Any] = {}
    for name, (dtype, default) in _FIELDS.items():
        feat = example.features.feature.get(name)
        if feat is None or not feat.ListFields():
            if default is None:
                raise SchemaError(f"record lacks the required feature {name!r}")
            out[name] = default if dtype != tf.string else str(default).encode()
            continue
        kind = feat.WhichOneof("kind")
        expected = {tf.string: "bytes_list", tf.int64: "int64_list", tf.float32: "float_list"}[
            dtype
        ]
        if kind != expected:
            raise SchemaError(f"feature {name!r} is {kind}, expected {expected}")
        values = getattr(feat, kind).value
        if len(values) != 1:
            raise SchemaError(f"feature {name!r} has {len(values)} values, expected 1")
        out[name] = values[0]
    if out["schema_version"] != SCHEMA_VERSION:
        raise SchemaError(
            f"record schema_version {out['schema_version']} != {SCHEMA_VERSION}; reconvert the data"
        )
    return out


def shard_name(split: str, index: int, num_shards: int, compression: str = "") -> str:
    """``train-00003-of-00016.tfrecord`` (``.tfrecord.gz`` with GZIP)."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise SchemaError(f"split name must be alphanumeric/underscore, got {split!r}")
    if not 0 <= index < num_shards:
        raise SchemaError(f"shard index {index} outside 0..{num_shards - 1}")
    suffix = ".tfrecord.gz" if compression.upper() == "GZIP" else ".tfrecord"
    return f"{split}-{index:05d}-of-{num_shards:05d}{suffix}"


def parse_shard_name(name: str) -> tuple[str, int, int]:
    """Inverse of :func:`shard_name`: ``(split, index, num_shards)``."""
    m = _SHARD_RE.match(os.path.basename(name))
    if not m:
        raise SchemaError(f"not a kd_histo shard name: {name!r}")
    return m["split"], int(m["index"]), int(m["total"])


def shard_paths(data_dir: str, split: str) -> list[str]:
    """Sorted shard paths of one split in ``data_dir``; raises if there are none."""
    names = sorted(
        n
        for n in tf.io.gfile.listdir(data_dir)
        if _SHARD_RE.match(n) and _SHARD_RE.match(n)["split"] == split
    )
    if not names:
        raise FileNotFoundError(f"no '{split}' shards ({split}-*-of-*.tfrecord) in {data_dir}")
    return [os.path.join(data_dir, n) for n in names]


def has_shards(data_dir: str, split: str) -> bool:
    """Whether ``data_dir`` holds shards of ``split`` (:func:`shard_paths` without the error)."""
    try:
        return bool(shard_paths(data_dir, split))
    except FileNotFoundError:
        return False


@dataclasses.dataclass
class DatasetInfo:
    """The JSON description written beside the shards (``dataset.json``).

    Attributes:
      class_names: index -> name; labels in the shards index this list.
      tile_px: side of the stored (high-resolution) tiles in pixels.
      mpp: microns per pixel of the stored tiles (0 when unknown).
      counts: split -> class name (or "unlabeled") -> number of records.
      shards: split -> number of shards.
      mean: per-channel mean of the training split, RGB in [0, 1].
      std: per-channel standard deviation of the training split, RGB in [0, 1].
      compression: "" or "GZIP".
      image_format: "png" or "jpeg".
      lr_factor: factor of the stored pyramid LR tiles (0 when none are stored).
      source: free text (folder, manifest, slides).
      command: the command line that made the data set.
      skipped: list of {"path", "reason"} for inputs left out.
      notes: list of free-text notes (e.g. images converted from 16-bit).
      annotations: per slide labelled from regions: {"slide", "annotations" (the file),
        "sha256" (of the file), "regions", "labeled", "unlabeled", "dropped" (reason -> tiles)}.
    """

    class_names: list[str]
    tile_px: int
    mpp: float = 0.0
    counts: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    shards: dict[str, int] = dataclasses.field(default_factory=dict)
    mean: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = dataclasses.field(default_factory=lambda: [0.25, 0.25, 0.25])
    compression: str = ""
    image_format: str = "png"
    lr_factor: float = 0.0
    source: str = ""
    command: str = ""
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    annotations: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def num_examples(self, split: str) -> int:
        return sum(self.counts.get(split, {}).values())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["num_classes"] = self.num_classes
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DatasetInfo:
        d = dict(d)
        d.pop("num_classes", None)
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SchemaError(
                f"dataset.json has schema_version {version!r}, this kd_histo reads "
                f"{SCHEMA_VERSION}; "
                "reconvert the data with kd-histo-convert"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SchemaError(f"dataset.json has unknown keys {unknown}")
        for key in ("class_names", "tile_px"):
            if key not in d:
                raise SchemaError(f"dataset.json lacks {key!r}")
        info = cls(**d)
        if not info.class_names or len(set(info.class_names)) != len(info.class_names):
            raise SchemaError(
                f"dataset.json class_names must be non-empty and unique: {info.class_names}"
            )
        if (
            len(info.mean) != 3
            or len(info.std) != 3
            or not all(math.isfinite(v) for v in [*info.mean, *info.std])
            or min(info.std) <= 0
        ):
            raise SchemaError(
                f"dataset.json mean/std must be 3 finite values each, std > 0; got mean "
                f"{info.mean}, std {info.std}: reconvert the data"
            )
        return info

    def write(self, data_dir: str) -> str:
        """Writes ``dataset.json`` atomically (temporary file, then rename)."""
        path = os.path.join(data_dir, DATASET_JSON)
        with replacing(path) as tmp, tf.io.gfile.GFile(tmp, "w") as f:
            f.write(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, data_dir: str) -> DatasetInfo:
        """Reads ``dataset.json`` from a data folder, with a clear error when absent or broken."""
        path = data_dir if data_dir.endswith(".json") else os.path.join(data_dir, DATASET_JSON)
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(
                f"{path} not found: point at a folder made by kd-histo-convert (it holds "
                "dataset.json)"
            )
        try:
            with tf.io.gfile.GFile(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise SchemaError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)
