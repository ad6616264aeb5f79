"""Teacher-output cache: the frozen teacher's logits and resized feature targets, computed once.

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
instead of running the teacher. Colour augmentations are not cacheable and are left out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf

from kd_histo import schema
from kd_histo.atomic import write_json
from kd_histo.data.augment import NUM_DIHEDRAL, dihedral, dihedral_per_example
from kd_histo.data.mixing import example_key
from kd_histo.data.pipeline import PipelineConfig, make_dataset, unlabeled_sources
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
      bicubic_style: "torch" or "tf" (see :func:`kd_histo.training.losses.bicubic_resize`).
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
    resizers = [
        L.FeatureMapKD(t.feature_mode, bicubic_style=t.bicubic_style).target for t in targets
    ]
    for t in targets:
        os.makedirs(t.cache_dir, exist_ok=True)

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

    n, keys, shapes = 0, [], None
    with contextlib.ExitStack() as files:
        f_logits = [
            files.enter_context(open(os.path.join(t.cache_dir, "logits.f32"), "wb"))
            for t in targets
        ]
        f_feats = [
            files.enter_context(open(os.path.join(t.cache_dir, f"features.{feature_dtype}"), "wb"))
            for t in targets
        ]
        for batch in batches:
            logits, feats = outputs(batch[teacher_view])
            raw = logits.numpy().astype(np.float32).tobytes()
            for j in range(len(targets)):
                f_logits[j].write(raw)
                f_feats[j].write(feats[j].numpy().astype(feature_dtype).tobytes())
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
    out = []
    for t, size in zip(targets, sizes):
        with open(os.path.join(t.cache_dir, "keys.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(keys) + "\n")
        spec = CacheSpec(
            n,
            n_t,
            int(shapes[0]),
            size,
            int(shapes[1]),
            feature_dtype,
            t.feature_mode,
            t.bicubic_style,
            teacher_view,
        )
        with open(os.path.join(t.cache_dir, META), "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(spec), f, indent=2)
        out.append(TeacherCache(t.cache_dir))
    return out


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
                "(kd_histo.training.teacher_cache.build_cache)"
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


# -- a cache for a training run --------------------------------------------------------------------
BUILT_FOR = "built_for.json"
IN_MEMORY_BYTES = 1 << 30  # smaller caches are gathered from memory, larger ones read from disk
CACHEABLE_AUGMENT = ("none", "flips")  # flips = the 8 dihedral transforms the cache stores


def training_sources(data) -> list[tuple[str, str]]:
    """(data_dir, split) pairs the training stream of a PipelineConfig can read.

    The labeled ``train`` split when labeled tiles are drawn, and the whole unlabeled pool (every
    fraction of it is a subset) when unlabeled tiles are drawn.
    """

    out = []
    if data.labeled and data.unlabeled_ratio < 1.0:
        out.append((os.path.abspath(data.data_dir), "train"))
    if data.unlabeled_ratio > 0.0 or not data.labeled:
        out += [(os.path.abspath(d), s) for d, splits in unlabeled_sources(data) for s in splits]
    return out


def _sha256(path: str, limit: int | None = None) -> str:
    """SHA-256 of a file, or of its first and last ``limit`` bytes when it is over 2x that."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if limit is None or size <= 2 * limit:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(limit))
            f.seek(size - limit)
            h.update(f.read(limit))
    return h.hexdigest()


def _teacher_identity(path: str) -> dict:
    """The teacher file by path, size, mtime and its bytes' SHA-256 (another teacher saved over
    the same path, even keeping size and mtime, is another teacher)."""
    st = os.stat(path)
    return {
        "path": os.path.realpath(path),
        "bytes": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": _sha256(path),
    }


def _source_identity(data_dir: str, split: str) -> tuple[str, str, str]:
    """(data_dir, split, fingerprint): the fingerprint changes whenever the split's shards or the
    folder's dataset.json do (a reconversion with other settings keeps the paths and the record
    keys but not the pixels). Each shard counts by name, size, mtime and the SHA-256 of its first
    and last MiB; dataset.json by its SHA-256."""
    h = hashlib.sha256(_sha256(os.path.join(data_dir, schema.DATASET_JSON)).encode())
    for p in schema.shard_paths(data_dir, split):
        st = os.stat(p)
        h.update(
            f"{os.path.basename(p)} {st.st_size} {st.st_mtime_ns} {_sha256(p, 1 << 20)}\n".encode()
        )
    return os.path.realpath(data_dir), split, h.hexdigest()


def _is_current(source: tuple[str, str, str]) -> bool:
    try:
        return _source_identity(source[0], source[1]) == tuple(source)
    except (OSError, ValueError):  # the folder or split is gone
        return False


def for_training(
    teacher: keras.Model,
    teacher_path: str,
    data,
    cache_dir: str,
    *,
    map_size: tuple[int, int],
    feature_mode: str,
    bicubic_style: str = L.BICUBIC_STYLE,
    log=print,
) -> TeacherCache:
    """The cache a distillation run reads: reused when it fits the run, else (re)built.

    A cache fits when it was built from the same teacher file (path, size, mtime, SHA-256) for the
    same views (HR crop, factor, LR method, augmentation, student map size, feature resize) and
    covers every source the run reads (:func:`training_sources`) as it is now (shards and
    dataset.json fingerprinted, :func:`_source_identity`: a reconverted folder is another
    source), so runs that differ only in how much of the unlabeled pool they draw share one
    cache. ``built_for.json`` is written last: a build cut short is never mistaken for a finished
    cache.

    Args:
      teacher: the frozen teacher net.
      teacher_path: its ``.keras`` file (identifies the teacher).
      data: the run's PipelineConfig (augment "none" or "flips", no random crop).
      cache_dir: where the cache lives.
      map_size: (h, w) of the student's feature map at the LR input size.
      feature_mode: how the teacher map is resized to ``map_size``.
      bicubic_style: "torch" or "tf" bicubic kernel.
      log: receives one line when the cache is built.

    Returns:
      The opened cache (in memory when its arrays take less than 1 GiB as float32).
    """
    if data.augment not in CACHEABLE_AUGMENT:
        raise ValueError(
            f"a teacher cache holds the {CACHEABLE_AUGMENT} augmentations only, not "
            f"{data.augment!r}; use --augment=flips or drop --teacher_cache"
        )
    return _fitting_cache(
        teacher,
        teacher_path,
        data,
        cache_dir,
        training_sources(data),
        dihedral=data.augment == "flips",
        map_size=map_size,
        feature_mode=feature_mode,
        bicubic_style=bicubic_style,
        log=log,
    )


VALIDATION_SUBDIR = "val"


def for_validation(
    teacher: keras.Model,
    teacher_path: str,
    data,
    cache_dir: str,
    *,
    map_size: tuple[int, int],
    feature_mode: str,
    bicubic_style: str = L.BICUBIC_STYLE,
    log=print,
) -> TeacherCache:
    """The cache of the teacher's outputs on the ``val`` split (identity view only).

    Validation sees every val tile once per epoch, un-augmented, so the frozen teacher's outputs
    there never change either; without a cache each epoch's validation runs the teacher on every
    HR val tile (about 40% of a cached x8 student's epoch on LC25000). Lives in
    ``<cache_dir>/val`` and is reused or rebuilt by the same rules as :func:`for_training`.
    Attach it with ``attach(val_batches, training=False)``.
    """
    return _fitting_cache(
        teacher,
        teacher_path,
        data,
        os.path.join(cache_dir, VALIDATION_SUBDIR),
        [(os.path.abspath(data.data_dir), "val")],
        dihedral=False,
        map_size=map_size,
        feature_mode=feature_mode,
        bicubic_style=bicubic_style,
        log=log,
    )


@dataclasses.dataclass(frozen=True)
class _Build:
    """A cache that does not fit its run yet: what to build and over which sources."""

    target: CacheTarget
    settings: dict
    sources: tuple[tuple[str, str, str], ...]
    dihedral: bool
    data: PipelineConfig  # the run's (its HR view is the teacher's input)


def _needed_build(
    teacher_path: str,
    data,
    cache_dir: str,
    need_splits,
    *,
    dihedral: bool,
    map_size,
    feature_mode: str,
    bicubic_style: str,
) -> _Build | None:
    """None when the cache in ``cache_dir`` fits the views and covers ``need_splits``
    ([(data_dir, split)]); else what to (re)build (see :func:`for_training`)."""
    settings = {
        "teacher": _teacher_identity(teacher_path),
        "hr_px": data.hr_px,
        "factor": data.factor,
        "lr_method": data.lr_method,
        "dihedral": dihedral,
        "map_size": list(map_size),
        "feature_mode": feature_mode,
        "bicubic_style": bicubic_style,
    }
    need = [_source_identity(d, split) for d, split in need_splits]
    meta_path = os.path.join(cache_dir, BUILT_FOR)
    covered: list[tuple[str, str, str]] = []
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta["settings"] == settings:
            covered = [
                tuple(s) for s in meta["sources"] if len(s) == 3
            ]  # older caches: no fingerprints
    if set(need) <= set(covered):
        return None
    # keep what the cache covers of other sources only while those are unchanged
    sources = tuple(sorted(set(need) | {c for c in covered if _is_current(c)}))
    target = CacheTarget(cache_dir, tuple(int(v) for v in map_size), feature_mode, bicubic_style)
    return _Build(target, settings, sources, dihedral, data)


def _build(teacher, builds: Sequence[_Build], log) -> None:
    """Builds the caches, one teacher pass for all that read the same sources and HR view."""
    groups: dict[tuple, list[_Build]] = {}
    for b in builds:
        groups.setdefault((b.sources, b.dihedral, b.data.hr_px), []).append(b)
    for (sources, all_eight, _), group in groups.items():
        for b in group:
            meta_path = os.path.join(b.target.cache_dir, BUILT_FOR)
            if os.path.isfile(meta_path):
                os.remove(meta_path)  # the files below are about to change
        data = group[0].data
        view = PipelineConfig(
            data.data_dir,
            batch_size=64,
            factor=data.factor,
            hr_px=data.hr_px,
            lr_method=data.lr_method,
            augment="none",
        )
        batches = None
        for d, split, _ in sources:
            part = make_dataset(dataclasses.replace(view, data_dir=d), split, training=False)
            batches = part if batches is None else batches.concatenate(part)
        n_t = NUM_DIHEDRAL if all_eight else 1
        into = ", ".join(b.target.cache_dir for b in group)
        log(f"teacher cache: running the teacher {n_t}x over {len(sources)} source(s) into {into}")
        build_caches(teacher, batches, [b.target for b in group], dihedral_transforms=all_eight)
        for b in group:  # written last: a build cut short is never taken for a finished cache
            write_json(
                os.path.join(b.target.cache_dir, BUILT_FOR),
                {"settings": b.settings, "sources": list(b.sources)},
                sort_keys=False,
            )


def _open(cache_dir: str) -> TeacherCache:
    cache = TeacherCache(cache_dir)
    s = cache.spec
    nbytes = (
        s.num_examples
        * s.num_transforms
        * (s.num_classes + s.map_size[0] * s.map_size[1] * s.channels)
        * 4
    )
    return TeacherCache(cache_dir, in_memory=True) if nbytes < IN_MEMORY_BYTES else cache


def _fitting_cache(
    teacher,
    teacher_path: str,
    data,
    cache_dir: str,
    need_splits,
    *,
    dihedral: bool,
    map_size,
    feature_mode: str,
    bicubic_style: str,
    log,
) -> TeacherCache:
    """Opens the cache in ``cache_dir`` when it fits the views and covers ``need_splits``
    ([(data_dir, split)]), else (re)builds it; see :func:`for_training`."""
    build = _needed_build(
        teacher_path,
        data,
        cache_dir,
        need_splits,
        dihedral=dihedral,
        map_size=map_size,
        feature_mode=feature_mode,
        bicubic_style=bicubic_style,
    )
    if build is not None:
        _build(teacher, [build], log)
    return _open(cache_dir)


@dataclasses.dataclass(frozen=True)
class CacheUse:
    """One distillation run's caches, as :func:`for_training` and :func:`for_validation` would
    open them: its PipelineConfig, cache folder and student feature-map size."""

    data: PipelineConfig
    cache_dir: str
    map_size: tuple[int, int]
    feature_mode: str
    bicubic_style: str = L.BICUBIC_STYLE
    validation: bool = True  # the data set has a val split


def prebuild(teacher: keras.Model, teacher_path: str, uses: Sequence[CacheUse], log=print) -> int:
    """Builds every cache the runs of ``uses`` will read that does not fit yet, running the
    teacher once over each set of sources instead of once per run's cache.

    A protocol's students of factors x2, x4 and x8 read one teacher's outputs on the same HR
    tiles, resized to three map sizes; built run by run, the teacher ran three times over the
    labeled and unlabeled tiles (about 3.5 min each on LC25000, 2 cores). The caches are exactly
    those the runs would have built; the runs then find them fitting.

    Returns:
      How many caches were built (training and validation caches each count).
    """
    # Runs that share a cache folder (one factor's students, each drawing its own share of the
    # unlabeled pool) need it to cover all their sources together.
    wanted: dict[str, tuple[CacheUse, bool, list]] = {}
    for u in uses:
        if u.data.augment not in CACHEABLE_AUGMENT:
            raise ValueError(
                f"a teacher cache holds the {CACHEABLE_AUGMENT} augmentations only, not "
                f"{u.data.augment!r}"
            )
        parts = [(u.cache_dir, u.data.augment == "flips", training_sources(u.data))]
        if u.validation:
            parts.append(
                (
                    os.path.join(u.cache_dir, VALIDATION_SUBDIR),
                    False,
                    [(os.path.abspath(u.data.data_dir), "val")],
                )
            )
        for cache_dir, all_eight, splits in parts:
            first, _, need = wanted.setdefault(cache_dir, (u, all_eight, []))
            if (first.map_size, first.feature_mode, first.bicubic_style, first.data.hr_px) != (
                    u.map_size, u.feature_mode, u.bicubic_style, u.data.hr_px):  # fmt: skip
                raise ValueError(
                    f"{cache_dir}: runs that share this teacher cache need other views of it "
                    f"(map size, feature resize or HR size); give them separate caches"
                )
            need += [s for s in splits if s not in need]
    builds = [
        _needed_build(
            teacher_path,
            u.data,
            cache_dir,
            need,
            dihedral=all_eight,
            map_size=u.map_size,
            feature_mode=u.feature_mode,
            bicubic_style=u.bicubic_style,
        )
        for cache_dir, (u, all_eight, need) in wanted.items()
    ]
    todo = [b for b in builds if b is not None]
    if todo:
        _build(teacher, todo, log)
    return len(todo)
