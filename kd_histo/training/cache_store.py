"""Teacher-output cache files: the frozen teacher's logits and resized feature targets, built once.

Distillation spends most of its time in the teacher's forward pass on the HR view. The teacher is
frozen, so for a fixed tile and a fixed augmentation its outputs never change. When augmentation
is a finite set — the 8 dihedral transforms of the square (flips and 90-degree rotations) — this
module runs the teacher once per tile and transform, resizes its feature map to the student's map
size (so later epochs skip the resize as well), and stores both as raw ``np.memmap`` files:

    <cache_dir>/cache.json        shapes, dtypes, feature mode, key list size
    <cache_dir>/logits.f32        [N, T, C] float32
    <cache_dir>/features.<dtype>  [N, T, h, w, F] (float16 by default: half the disk, exact enough)
    <cache_dir>/keys.txt          one tile key per row (``kd_histo.data.mixing.example_key``)

:meth:`TeacherCache.attach` turns un-augmented pipeline batches (``augment="none"``) into
distillation batches: it draws one dihedral transform per example, applies it to the ``hr``/``lr``
views (area/bicubic downsampling commutes with these transforms) and adds ``teacher_logits``/
``teacher_features`` from the cache, which :class:`kd_histo.training.distiller.ResolutionDistiller`
uses
instead of running the teacher. Colour augmentations are not cacheable and are left out; ``lr2``
is passed through untouched.

Not here: which cache a run reads, and when it is reused or rebuilt
(``kd_histo.training.teacher_cache``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf

from kd_histo.data.augment import NUM_DIHEDRAL, dihedral, dihedral_per_example
from kd_histo.data.mixing import example_key
from kd_histo.training import losses as L

META = "cache.json"


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """What a cache holds (written to ``cache.json``)."""

    num_examples: int
    num_transforms: int
    num_classes: int
    map_size: tuple[int, int]
    channels: int
    feature_dtype: str
    feature_mode: str
    bicubic_style: str
    teacher_view: str


def build_cache(
    teacher: keras.Model,
    batches: Iterable[dict],
    cache_dir: str,
    *,
    map_size: tuple[int, int],
    feature_mode: str = L.FEATURE_MODE,
    bicubic_style: str = L.BICUBIC_STYLE,
    teacher_view: str = "hr",
    dihedral_transforms: bool = True,
    feature_dtype: str = "float16",
) -> TeacherCache:
    """Runs ``teacher`` over ``batches`` once per transform and writes the cache.

    Args:
      teacher: the frozen teacher net (dict outputs ``logits``/``features``).
      batches: un-augmented batches in a fixed order (``make_dataset(..., training=False)`` or a
        pipeline with ``augment="none"``), each with ``teacher_view`` and the tile key fields
        ``source``, ``slide_id``, ``x``, ``y``.
      cache_dir: output folder (created; existing cache files are replaced).
      map_size: (h, w) of the student's feature map for its input size.
      feature_mode: how the teacher map is resized ("maxpool", "bicubic", "maxpool+bicubic"): the
        features stored are ``FeatureMapKD(feature_mode, bicubic_style=...).target``, the feature
        loss's own target, which that loss then uses as is.
      bicubic_style: "torch" or "tf" (see :func:`kd_histo.training.map_resize.bicubic_resize`).
      teacher_view: batch key of the teacher's input.
      dihedral_transforms: cache all 8 dihedral transforms (else only the identity).
      feature_dtype: "float16" or "float32" storage of the feature targets.

    Returns:
      The opened :class:`TeacherCache`.
    """
    target = CacheTarget(cache_dir, map_size, feature_mode, bicubic_style)
    return build_caches(
        teacher,
        batches,
        [target],
        teacher_view=teacher_view,
        dihedral_transforms=dihedral_transforms,
        feature_dtype=feature_dtype,
    )[0]


@dataclasses.dataclass(frozen=True)
class CacheTarget:
    """Where one cache goes and how its feature targets are resized (see :func:`build_cache`)."""

    cache_dir: str
    map_size: tuple[int, int]
    feature_mode: str = L.FEATURE_MODE
    bicubic_style: str = L.BICUBIC_STYLE


def build_caches(
    teacher: keras.Model,
    batches: Iterable[dict],
    targets: Sequence[CacheTarget],
    *,
    teacher_view: str = "hr",
    dihedral_transforms: bool = True,
    feature_dtype: str = "float16",
) -> list[TeacherCache]:
    """:func:`build_cache` for several students of one teacher at once: the teacher runs once
    per batch and transform, and each target gets its own resize of the same feature map (the
    students of factors x2, x4 and x8 read maps of three sizes). Each cache is what
    :func:`build_cache` alone writes for its target, to the bit.

    Returns:
      The opened caches, in the order of ``targets``.
    """
    if feature_dtype not in ("float16", "float32"):
        raise ValueError(f"feature_dtype must be float16 or float32, got {feature_dtype!r}")
    if not targets:
        raise ValueError("build_caches needs at least one target")
    n_t = NUM_DIHEDRAL if dihedral_transforms else 1
    sizes = [(int(t.map_size[0]), int(t.map_size[1])) for t in targets]
    for t in targets:
        os.makedirs(t.cache_dir, exist_ok=True)
    outputs = _teacher_outputs(teacher, targets, sizes, n_t)
    n, keys, (classes, channels) = _write_arrays(
        outputs, batches, targets, teacher_view, feature_dtype
    )
    out = []
    for t, size in zip(targets, sizes):
        with open(os.path.join(t.cache_dir, "keys.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(keys) + "\n")
        spec = CacheSpec(
            n,
            n_t,
            int(classes),
            size,
            int(channels),
            feature_dtype,
            t.feature_mode,
            t.bicubic_style,
            teacher_view,
        )
        with open(os.path.join(t.cache_dir, META), "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(spec), f, indent=2)
        out.append(TeacherCache(t.cache_dir))
    return out


def _teacher_outputs(teacher, targets: Sequence[CacheTarget], sizes, n_t: int):
    """A tf.function: images -> (logits [B, T, C], per target features [B, T, h, w, F]), the
    teacher run once per transform and its map resized once per target."""
    resizers = [
        L.FeatureMapKD(t.feature_mode, bicubic_style=t.bicubic_style).target for t in targets
    ]

    @tf.function(reduce_retracing=True)
    def outputs(images):
        logits, feats = [], [[] for _ in targets]
        for k in range(n_t):
            out = teacher(dihedral(images, k), training=False)
            logits.append(tf.cast(out["logits"], tf.float32))
            for j, (resize, size) in enumerate(zip(resizers, sizes)):
                feats[j].append(resize(out["features"], size))
        # [B, T, C], and per target [B, T, h, w, F]
        return tf.stack(logits, axis=1), [tf.stack(f, axis=1) for f in feats]

    return outputs


def _write_arrays(
    outputs, batches: Iterable[dict], targets: Sequence[CacheTarget], teacher_view: str, dtype: str
) -> tuple[int, list[str], tuple[int, int]]:
    """Streams the teacher's outputs over ``batches`` into each target's logits.f32 and
    features.<dtype>; returns the tile count, the tile keys and (classes, feature channels)."""
    n, keys, shapes = 0, [], None
    with contextlib.ExitStack() as files:
        f_logits = [
            files.enter_context(open(os.path.join(t.cache_dir, "logits.f32"), "wb"))
            for t in targets
        ]
        f_feats = [
            files.enter_context(open(os.path.join(t.cache_dir, f"features.{dtype}"), "wb"))
            for t in targets
        ]
        for batch in batches:
            logits, feats = outputs(batch[teacher_view])
            raw = logits.numpy().astype(np.float32).tobytes()
            for j in range(len(targets)):
                f_logits[j].write(raw)
                f_feats[j].write(feats[j].numpy().astype(dtype).tobytes())
            keys.extend(k.decode("utf-8") for k in example_key(batch).numpy())
            shapes = (logits.shape[-1], feats[0].shape[-1])
            n += int(logits.shape[0])
    if n == 0:
        raise ValueError("build_cache got no batches: the dataset is empty")
    if len(set(keys)) != len(keys):
        raise ValueError(
            "tile keys (source, slide_id, x, y) repeat in the data set; "
            "the cache needs unique tiles"
        )
    return n, keys, shapes


class TeacherCache:
    """A written cache, memory-mapped for reading.

    Args:
      cache_dir: a folder written by :func:`build_cache`.
      in_memory: load the arrays into TF constants (fast gather) instead of reading the memmaps
        through ``tf.numpy_function`` (any size, page cache does the rest).
    """

    def __init__(self, cache_dir: str, in_memory: bool = False):
        self.cache_dir = cache_dir
        meta = os.path.join(cache_dir, META)
        if not os.path.isfile(meta):
            raise FileNotFoundError(
                f"{meta} not found: build the cache first "
                "(kd_histo.training.cache_store.build_cache)"
            )
        with open(meta, encoding="utf-8") as f:
            d = json.load(f)
        d["map_size"] = tuple(d["map_size"])
        self.spec = CacheSpec(**d)
        s = self.spec
        self.logits = np.memmap(
            os.path.join(cache_dir, "logits.f32"),
            np.float32,
            "r",
            shape=(s.num_examples, s.num_transforms, s.num_classes),
        )
        self.features = np.memmap(
            os.path.join(cache_dir, f"features.{s.feature_dtype}"),
            s.feature_dtype,
            "r",
            shape=(s.num_examples, s.num_transforms, *s.map_size, s.channels),
        )
        with open(os.path.join(cache_dir, "keys.txt"), encoding="utf-8") as f:
            self.keys = f.read().splitlines()
        if len(self.keys) != s.num_examples:
            raise ValueError(
                f"{cache_dir}: keys.txt has {len(self.keys)} rows, cache.json says {s.num_examples}"
            )
        self._table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(self.keys), tf.range(len(self.keys), dtype=tf.int64)
            ),
            default_value=-1,
        )
        self._in_memory = in_memory
        if in_memory:
            self._logits_t = tf.constant(np.asarray(self.logits))
            self._features_t = tf.constant(np.asarray(self.features, np.float32))

    def rows(self, batch: dict) -> tf.Tensor:
        """Cache rows of a batch's tiles; fails with a clear message for a tile not in the cache."""
        keys = example_key(batch)
        rows = self._table.lookup(keys)
        check = tf.debugging.assert_non_negative(
            rows,
            message="kd_histo: a tile is missing from the teacher cache; "
            "rebuild it for this data set",
        )
        with tf.control_dependencies([check]):
            return tf.identity(rows)

    def lookup(self, rows: tf.Tensor, ks: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Cached ``(logits [B, C], features [B, h, w, F])``, float32, of rows and transforms."""
        s = self.spec
        if self._in_memory:
            idx = tf.stack([rows, tf.cast(ks, tf.int64)], axis=1)
            return tf.gather_nd(self._logits_t, idx), tf.gather_nd(self._features_t, idx)

        def read(r, k):
            return self.logits[r, k], self.features[r, k].astype(np.float32)

        logits, feats = tf.numpy_function(
            read, [rows, tf.cast(ks, tf.int64)], [tf.float32, tf.float32]
        )
        logits.set_shape([None, s.num_classes])
        feats.set_shape([None, *s.map_size, s.channels])
        return logits, feats

    def attach(
        self, batches: tf.data.Dataset, *, training: bool = True, seed: int = 0
    ) -> tf.data.Dataset:
        """Adds ``teacher_logits``/``teacher_features`` to un-augmented batches.

        In training, each example gets a random dihedral transform (when the cache holds all 8),
        applied to its ``hr`` and ``lr`` views; in evaluation the identity is used.
        """
        n_t = self.spec.num_transforms

        def add(batch, step_seed):
            batch = dict(batch)
            b = tf.shape(batch["lr"])[0]
            if training and n_t > 1:
                ks = tf.random.stateless_uniform(
                    [b], seed=step_seed, minval=0, maxval=n_t, dtype=tf.int32
                )
                for view in ("hr", "lr"):
                    if view in batch:
                        batch[view] = dihedral_per_example(batch[view], ks)
            else:
                ks = tf.zeros([b], tf.int32)
            batch["teacher_logits"], batch["teacher_features"] = self.lookup(self.rows(batch), ks)
            return batch

        seeds = tf.data.Dataset.random(seed=seed).batch(2)
        return tf.data.Dataset.zip(batches, seeds).map(add, num_parallel_calls=tf.data.AUTOTUNE)
