"""Small helpers shared by the conversion tests: tiny images and shard readers."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from kd_histo import schema


def write_image(path, rgb: np.ndarray, **save_kwargs) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.fromarray(rgb).save(str(path), **save_kwargs)
    return str(path)


def random_rgb(seed: int, px: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (px, px, 3), dtype=np.uint8)


def read_split(data_dir: str, split: str, compression: str = "") -> list[dict]:
    """All records of one split, parsed eagerly, in shard order."""
    import tensorflow as tf

    out = []
    for path in schema.shard_paths(data_dir, split):
        ds = tf.data.TFRecordDataset(path, compression_type=compression or None)
        out += [schema.parse_example_numpy(r) for r in ds.as_numpy_iterator()]
    return out


def check_split_counts(data_dir: str, info) -> int:
    """Asserts each split's records hold the class counts ``info`` (the DatasetInfo) states;
    returns how many records all splits hold."""
    total = 0
    for split, counts in info.counts.items():
        recs = read_split(data_dir, split)
        total += len(recs)
        names = [info.class_names[r["label"]] if r["label"] >= 0 else "unlabeled" for r in recs]
        assert {n: names.count(n) for n in set(names)} == counts, split
    return total


def decode(png: bytes) -> np.ndarray:
    import io

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def shard_bytes(data_dir: str) -> dict[str, bytes]:
    """File name -> bytes of every shard and dataset.json (minus its command) in a folder."""
    out = {}
    for name in sorted(os.listdir(data_dir)):
        if name.endswith(".tfrecord") or name.endswith(".tfrecord.gz"):
            with open(os.path.join(data_dir, name), "rb") as f:
                out[name] = f.read()
    return out
