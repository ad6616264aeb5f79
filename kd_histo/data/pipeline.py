"""``make_dataset``: shards + ``dataset.json`` -> batches of paired HR/LR views (the data contract).

Training: shard files interleaved in a seeded order -> parse + decode to uint8 -> optional cache
-> repeat + shuffle (or class-balanced sampling) -> mixing with the unlabeled pool at a ratio ->
cut into epochs -> one stateless seed per element (``Dataset.random``) -> crop + augment once,
make ``hr``/``lr`` -> batch -> prefetch. Every random draw of epoch ``e`` comes from the seeds
``epoch_seeds(cfg.seed, e)``, so an epoch is a pure function of the seed and its number: a run
resumed at epoch ``e`` (``training_stream(..., first_epoch=e)``) reads what the uninterrupted
run read. Evaluation: file order, centre crop, no augmentation, no drop_remainder, one pass.
Everything runs inside the tf.data graph (no ``py_function``).

Batches: {"hr" [B, hr_px, hr_px, 3], "lr" [B, lr_px, lr_px, 3], "label" int32 [B]
(-1 = unlabeled), "slide_id" string, "x", "y" int64, "source" string}; pixels float32 in
[0, 1] unless ``normalize=True`` (training-split mean/std from ``dataset.json``; by default the
models normalise in their first layer, see BUILD_NOTES.md).

Not here: decoding details (``decode``), augmentation ops (``augment``, ``stain``), view making
(``views``), mixing (``mixing``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import tensorflow as tf

from kd_histo import schema
from kd_histo.data import augment, decode, mixing, views
from kd_histo.data.views import lr_size
from kd_histo.numbers import require_finite
from kd_histo.settings import SKIP_CORRUPT_HELP, setting

__all__ = [
    "PipelineConfig",
    "epoch_examples",
    "epoch_seeds",
    "lr_size",
    "make_dataset",
    "steps_per_epoch",
    "training_stream",
    "unlabeled_pool_size",
    "unlabeled_sources",
]

_IMAGE_KEYS = ("hr", "lr")
_NO_END = 1 << 62  # the last epoch of training_stream's epoch counter: none in practice
_GRAPH_SEED = 87654321  # the graph-level seed of every epoch's tf.data graph (see _epochs)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How to build batches from a converted data folder.

    Attributes:
      data_dir: folder with shards and ``dataset.json`` (made by kd-histo-convert).
      batch_size: examples per batch.
      factor: resolution factor of the ``lr`` view (2, 4, 8 or any float > 0).
      hr_px: side of the ``hr`` view; None = the stored tile size. Smaller than the tile: random
        crop in training, centre crop in evaluation.
      lr_method: "area" (default), "bicubic", "bilinear" (all antialiased) or "pyramid" (the
        stored pyramid LR tile; needs shards converted with ``lr_factor == factor``).
      augment: training preset, one of ``kd_histo.data.augment.PRESETS``.
      unlabeled_ratio: fraction of training examples drawn from the unlabeled pool.
      labeled: False = train on the unlabeled pool only (pure distillation); evaluation
        (``training=False``) always reads the requested split.
      class_balanced: sample the labeled classes with equal probability.
      cache: keep decoded uint8 tiles in memory after the first pass.
      shuffle_buffer: shuffle buffer size (examples).
      seed: the one seed of file order, shuffling, mixing and augmentation.
      skip_corrupt: skip corrupt records instead of failing with the shard's name.
      drop_remainder: drop the last partial batch in training (evaluation never drops).
      normalize: subtract the training mean and divide by the std of ``dataset.json``.
      unlabeled_dirs: more converted folders for the unlabeled pool: their ``unlabeled`` split,
        or all their splits (labels forced to -1) when they have none.
      unlabeled_fraction: deterministic subset (by tile hash, nested) of the unlabeled pool.
      cycle_length: shards read at once in training.
    """

    data_dir: str = setting(help="Folder with shards + dataset.json (kd-histo-convert output).")
    batch_size: int = setting(32, "Examples per batch.")
    factor: float = setting(2.0, "Resolution factor of the LR view (2, 4, 8).")
    hr_px: int | None = setting(
        None, "Side of the HR view; default the stored tile size (smaller: crop)."
    )
    lr_method: str = setting("area", "How the LR view is made: area, bicubic, bilinear, pyramid.")
    augment: str = setting("paper", "Training augmentation preset.")
    unlabeled_ratio: float = setting(0.0, "Fraction of training examples from the unlabeled pool.")
    labeled: bool = setting(
        True,
        "Read the labeled train split (distill uses its labels only with "
        "--ce_weight > 0); --nolabeled trains a student on the unlabeled pool alone.",
    )
    class_balanced: bool = False
    cache: bool = setting(False, "Keep decoded tiles in memory after the first pass.")
    shuffle_buffer: int = 1024
    seed: int = 0  # kd-histo-train sets it to the run's seed (RunConfig.seed, --seed)
    skip_corrupt: bool = setting(False, SKIP_CORRUPT_HELP)
    drop_remainder: bool = True
    normalize: bool = False
    unlabeled_dirs: tuple[str, ...] = setting(
        (), "More converted folders for the unlabeled pool (comma separated)."
    )
    unlabeled_fraction: float = 1.0
    cycle_length: int = 4

    def __post_init__(self):
        require_finite(self)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.factor <= 0:
            raise ValueError(f"factor must be > 0, got {self.factor}")
        if self.lr_method not in views.LR_METHODS:
            raise ValueError(
                f"lr_method {self.lr_method!r} unknown; choose one of {views.LR_METHODS}"
            )
        if self.augment not in augment.PRESETS:
            raise ValueError(f"augment {self.augment!r} unknown; choose one of {augment.PRESETS}")
        if not 0.0 <= self.unlabeled_ratio <= 1.0:
            raise ValueError(f"unlabeled_ratio must be in [0, 1], got {self.unlabeled_ratio}")
        if not 0.0 < self.unlabeled_fraction <= 1.0:
            raise ValueError(f"unlabeled_fraction must be in (0, 1], got {self.unlabeled_fraction}")
        if self.hr_px is not None and self.hr_px < 1:
            raise ValueError(f"hr_px must be >= 1 or None, got {self.hr_px}")
        if self.shuffle_buffer < 1 or self.cycle_length < 1:
            raise ValueError("shuffle_buffer and cycle_length must be >= 1")
        if isinstance(self.unlabeled_dirs, str):
            raise TypeError(
                f"unlabeled_dirs must be a tuple of folders, got the string {self.unlabeled_dirs!r}"
            )


def unlabeled_sources(cfg: PipelineConfig) -> list[tuple[str, list[str]]]:
    """(data_dir, splits) of the unlabeled pool: the data set's ``unlabeled`` split, and each of
    ``unlabeled_dirs``' ``unlabeled`` split (or all its splits, read with label -1)."""
    sources = (
        [(cfg.data_dir, ["unlabeled"])] if schema.has_shards(cfg.data_dir, "unlabeled") else []
    )
    for d in cfg.unlabeled_dirs:
        info = schema.DatasetInfo.read(d)
        sources.append(
            (d, ["unlabeled"] if schema.has_shards(d, "unlabeled") else sorted(info.shards))
        )
    return sources


def epoch_examples(cfg: PipelineConfig, split: str = "train", training: bool = True) -> int:
    """Examples in one epoch of ``make_dataset(cfg, split, training)``, from ``dataset.json``.

    Training with labeled data: the labeled count divided by (1 - unlabeled_ratio), so each
    labeled tile is seen about once per epoch; unlabeled only: the (fraction of the) pool.
    """
    info = schema.DatasetInfo.read(cfg.data_dir)
    if not training or (cfg.labeled and cfg.unlabeled_ratio < 1.0):
        n = info.num_examples(split)
        return n if not training else math.ceil(n / (1.0 - cfg.unlabeled_ratio))
    return max(1, round(unlabeled_pool_size(cfg) * cfg.unlabeled_fraction))


def batch_tiles(batch: dict) -> int:
    """Tiles in one batch of :func:`make_dataset` (what a loop's progress counts)."""
    return len(batch["label"])


def unlabeled_pool_size(cfg: PipelineConfig) -> int:
    """Tiles in the whole unlabeled pool (the ``unlabeled`` split + ``unlabeled_dirs``)."""
    return sum(
        schema.DatasetInfo.read(d).num_examples(s)
        for d, splits in unlabeled_sources(cfg)
        for s in splits
    )


def steps_per_epoch(cfg: PipelineConfig, split: str = "train", training: bool = True) -> int:
    """Batches per epoch of ``make_dataset(cfg, split, training)``."""
    n = epoch_examples(cfg, split, training)
    return n // cfg.batch_size if training and cfg.drop_remainder else math.ceil(n / cfg.batch_size)


def _read(cfg, data_dir, splits, tile_px, lr_tile_px, training, force_unlabeled=False):
    info = schema.DatasetInfo.read(data_dir)
    if info.tile_px != tile_px:
        raise ValueError(
            f"{data_dir} has {info.tile_px} px tiles, {cfg.data_dir} has {tile_px}; "
            "convert all sources at one tile size"
        )
    paths = [p for s in splits for p in schema.shard_paths(data_dir, s)]
    ds = decode.read_shards(
        paths,
        tile_px=tile_px,
        lr_tile_px=lr_tile_px,
        compression=info.compression,
        skip_corrupt=cfg.skip_corrupt,
        cycle_length=cfg.cycle_length if training else 1,
        shuffle_seed=cfg.seed if training else None,
    )
    if force_unlabeled:
        ds = ds.map(lambda ex: {**ex, "label": tf.constant(schema.UNLABELED, tf.int32)})
    return ds


# The independent random streams of one training epoch, each with its own seed (epoch_seeds).
_LABELED, _UNLABELED, _MIX, _AUGMENT, _CALLER = range(5)


def epoch_seeds(seed: int, epoch) -> tf.Tensor:
    """int64 seeds [5] of epoch ``epoch``'s random streams: labeled shuffle (or class balancing),
    unlabeled shuffle, mixing, augmentation, and one for the caller's own draws (the teacher
    cache's dihedral transforms); a pure function of ``seed`` and ``epoch`` (int or tensor)."""
    key = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.random.stateless_uniform([5], key, minval=None, maxval=None, dtype=tf.int64)


def _unlabeled_base(cfg, tile_px, lr_tile_px):
    """The unlabeled pool read once (subset, cache), not yet repeated or shuffled."""
    parts = []
    for d, splits in unlabeled_sources(cfg):
        parts.append(
            _read(
                cfg, d, splits, tile_px, lr_tile_px, True, force_unlabeled=splits != ["unlabeled"]
            )
        )
    if not parts:
        raise ValueError(
            f"no unlabeled data: {cfg.data_dir} has no 'unlabeled' split and unlabeled_dirs is "
            "empty; set unlabeled_ratio=0 and labeled=True, or add unlabeled_dirs"
        )
    pool = parts[0]
    for p in parts[1:]:
        pool = pool.concatenate(p)
    pool = mixing.subset(pool, cfg.unlabeled_fraction)
    return pool.cache() if cfg.cache else pool


def _labeled_base(cfg, info, split, tile_px, lr_tile_px):
    """The labeled split read once (cache), not yet repeated or shuffled."""
    if cfg.class_balanced:
        counts = info.counts.get(split, {})
        empty = [c for c in info.class_names if counts.get(c, 0) == 0]
        if empty:
            raise ValueError(
                f"class_balanced needs examples of every class; split {split!r} has none of {empty}"
            )
    ds = _read(cfg, cfg.data_dir, [split], tile_px, lr_tile_px, True)
    return ds.cache() if cfg.cache else ds


def _epoch_stream(cfg, info, split, labeled, unlabeled, seeds):
    """The infinite example stream that one epoch takes its examples from (``seeds``:
    :func:`epoch_seeds`). The same seeds give the same stream however often it is iterated."""
    stream = None
    if labeled is not None:
        counts = info.counts.get(split, {})
        if cfg.class_balanced:
            # A buffer larger than a class would read it several times before the first element.
            buffer = min(cfg.shuffle_buffer, max(counts.values()))
            stream = mixing.class_balanced(labeled, info.num_classes, seeds[_LABELED], buffer)
        else:
            buffer = max(1, min(cfg.shuffle_buffer, sum(counts.values())))
            stream = labeled.repeat().shuffle(
                buffer, seed=seeds[_LABELED], reshuffle_each_iteration=False
            )
    if unlabeled is not None:
        # A buffer larger than the pool would read the pool several times before the first element.
        buffer = min(cfg.shuffle_buffer, epoch_examples(dataclasses.replace(cfg, labeled=False)))
        pool = unlabeled.repeat().shuffle(
            buffer, seed=seeds[_UNLABELED], reshuffle_each_iteration=False
        )
        stream = (
            pool if stream is None else mixing.mix(stream, pool, cfg.unlabeled_ratio, seeds[_MIX])
        )
    return stream


def _epochs(cfg: PipelineConfig, split: str, first: int, end: int, examples: int, **kw):
    """The batches of training epochs ``first`` .. ``end - 1``, each cut from ``examples``
    examples; epoch ``e`` is a pure function of ``cfg`` (its seed) and ``e``. The shards are read
    (and cached) once for all of them. ``kw``: ``steps`` (batches kept per epoch) and
    ``per_epoch`` (see :func:`training_stream`)."""
    info, tile_px, lr_tile_px, view_fn = _geometry(cfg)
    with_labeled = cfg.labeled and cfg.unlabeled_ratio < 1.0
    labeled = _labeled_base(cfg, info, split, tile_px, lr_tile_px) if with_labeled else None
    with_pool = not with_labeled or cfg.unlabeled_ratio > 0.0
    unlabeled = _unlabeled_base(cfg, tile_px, lr_tile_px) if with_pool else None
    seed = tf.constant(cfg.seed, tf.int64)
    steps, per_epoch = kw.get("steps"), kw.get("per_epoch")

    def epoch(e: tf.Tensor) -> tf.data.Dataset:
        # Traced as a function: this sets the graph-level seed of its graph only. Pinned, it keeps
        # the epochs independent of the process's global seed, and tf.data's seeding cannot take
        # a tensor op seed in a graph whose graph-level seed is 0 (tf.random.set_seed(0)).
        tf.random.set_seed(_GRAPH_SEED)
        seeds = epoch_seeds(cfg.seed, e)
        stream = _epoch_stream(cfg, info, split, labeled, unlabeled, seeds).take(examples)
        keys = tf.data.Dataset.random(seed=seeds[_AUGMENT])
        ds = tf.data.Dataset.zip(stream, keys).map(
            lambda ex, k: views.make_views(
                ex, tf.stack([k, seed]), preset=cfg.augment, training=True, **view_fn
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        ds = _normalized(cfg, info, ds.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder))
        if steps is not None:
            ds = ds.take(steps)
        return per_epoch(ds, seeds[_CALLER]) if per_epoch else ds

    return tf.data.Dataset.range(first, end).flat_map(epoch)


def training_stream(
    cfg: PipelineConfig,
    split: str = "train",
    *,
    steps: int,
    first_epoch: int = 0,
    per_epoch: Callable[[tf.data.Dataset, tf.Tensor], tf.data.Dataset] | None = None,
) -> tf.data.Dataset:
    """The batches of a training run: epochs ``first_epoch``, ``first_epoch + 1``, ... without
    end, ``steps`` batches each.

    Epoch ``e`` is a pure function of ``cfg.seed`` and ``e`` (shuffling, mixing and augmentation
    draw from :func:`epoch_seeds`), so a run resumed at epoch ``e`` reads exactly the batches the
    uninterrupted run read. With ``steps`` equal to :func:`steps_per_epoch` an epoch is
    ``make_dataset(cfg, split, epoch=e)``; other step counts take ``steps`` batches of the same
    stream.

    Args:
      cfg: the pipeline configuration.
      split: the labeled split to train on.
      steps: batches per epoch (>= 1).
      first_epoch: the epoch the stream starts at.
      per_epoch: ``per_epoch(batches, seed)`` transforms each epoch's batches with that epoch's
        own int64 seed tensor (the teacher cache's random transforms).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    natural = steps == steps_per_epoch(cfg, split)
    examples = epoch_examples(cfg, split) if natural else steps * cfg.batch_size
    ds = _epochs(cfg, split, first_epoch, _NO_END, examples, steps=steps, per_epoch=per_epoch)
    return ds.prefetch(tf.data.AUTOTUNE)


def _geometry(cfg: PipelineConfig):
    """(info, tile_px, lr_tile_px, view settings) of ``cfg``'s data, checked."""
    info = schema.DatasetInfo.read(cfg.data_dir)
    tile_px = info.tile_px
    hr_px = cfg.hr_px or tile_px
    if hr_px > tile_px:
        raise ValueError(
            f"hr_px {hr_px} is larger than the stored tiles ({tile_px} px); lower hr_px"
        )
    lr_tile_px = 0
    if cfg.lr_method == "pyramid":
        if not info.lr_factor or abs(info.lr_factor - cfg.factor) > 1e-6:
            raise ValueError(
                f"lr_method='pyramid' needs shards with stored LR tiles at factor {cfg.factor}; "
                f"{cfg.data_dir} has lr_factor {info.lr_factor} (0 = none); use lr_method='area'"
            )
        lr_tile_px = lr_size(tile_px, info.lr_factor)
    return (
        info,
        tile_px,
        lr_tile_px,
        {"hr_px": hr_px, "factor": cfg.factor, "lr_method": cfg.lr_method},
    )


def _normalized(cfg: PipelineConfig, info, ds: tf.data.Dataset) -> tf.data.Dataset:
    if not cfg.normalize:
        return ds
    mean = tf.constant(info.mean, tf.float32)
    std = tf.constant(info.std, tf.float32)
    return ds.map(lambda b: {k: (v - mean) / std if k in _IMAGE_KEYS else v for k, v in b.items()})


def make_dataset(
    cfg: PipelineConfig, split: str = "train", training: bool = True, epoch: int = 0
) -> tf.data.Dataset:
    """Builds the batch stream of the data contract (see the module docstring).

    Args:
      cfg: the pipeline configuration.
      split: "train", "val", "test" or "unlabeled".
      training: augmentation, random crops, shuffling, mixing: the batches of epoch ``epoch``
        (:func:`epoch_examples` examples; every pass over the dataset gives the same batches, see
        :func:`training_stream` for a run's epochs); False: one pass in file order, centre
        crops, nothing random.
      epoch: the training epoch (training only).

    Returns:
      A ``tf.data.Dataset`` of batch dicts.
    """
    if training:
        ds = _epochs(cfg, split, epoch, epoch + 1, epoch_examples(cfg, split, training=True))
        return ds.prefetch(tf.data.AUTOTUNE)
    info, tile_px, lr_tile_px, view_fn = _geometry(cfg)
    ds = _read(cfg, cfg.data_dir, [split], tile_px, lr_tile_px, training=False)
    if cfg.cache:
        ds = ds.cache()
    fixed = tf.constant([0, cfg.seed], tf.int64)
    ds = ds.map(
        lambda ex: views.make_views(ex, fixed, preset="none", training=False, **view_fn),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    ds = ds.batch(cfg.batch_size, drop_remainder=False)
    return _normalized(cfg, info, ds).prefetch(tf.data.AUTOTUNE)
