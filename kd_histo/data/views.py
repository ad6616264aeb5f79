"""Paired views of one tile: ``hr`` for the teacher, ``lr`` for the student.

One crop and one augmentation (one stateless seed) are applied once, to the high-resolution
crop; ``lr`` is then that augmented crop resized by the factor with an antialiased method
(``area`` by default; ``bicubic`` and ``bilinear`` selectable), so the two views differ only in
resolution. With ``lr_method="pyramid"`` the stored pyramid LR tile is cropped at the aligned
position and given the same augmentation (the ops draw the same parameters whatever the size).

This module works on one decoded example; reading shards and batching live in
:mod:`kd_histo.data.decode` and :mod:`kd_histo.data.pipeline`.
"""

from __future__ import annotations

import tensorflow as tf

from kd_histo.data import augment as aug

LR_METHODS = ("area", "bicubic", "bilinear", "pyramid")


def lr_size(hr_px: int, factor: float) -> int:
    """Side of the low-resolution view: ``max(1, round(hr_px / factor))``."""
    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    return max(1, round(hr_px / factor))


def resize(image: tf.Tensor, size: int, method: str = "area") -> tf.Tensor:
    """Resizes [H, W, 3] or [B, H, W, 3] to ``size`` x ``size``, antialiased, clipped to [0, 1]."""
    if method not in ("area", "bicubic", "bilinear"):
        raise ValueError(f"resize method {method!r} unknown; choose area, bicubic or bilinear")
    out = tf.image.resize(image, [size, size], method=method, antialias=True)
    return tf.clip_by_value(out, 0.0, 1.0)  # bicubic overshoots at sharp edges


def memory_method(lr_method: str) -> str:
    """How an LR view is made from an HR tile in memory: ``lr_method``, or "area" for "pyramid"
    (no stored pyramid tile there: the nearest antialiased resize, as conversion's pyramid-free
    fallback)."""
    return "area" if lr_method == "pyramid" else lr_method


def resize_portable(image: tf.Tensor, size: int, method: str = "area") -> tf.Tensor:
    """:func:`resize` in ops every runtime has: an area resize of a square side by a whole factor
    is the mean of each factor x factor block, so it is average pooling (TFLite has no area-resize
    op); the same numbers as :func:`resize` to float round-off. Any other case is :func:`resize`.
    """
    side = image.shape[-2]
    if method != "area" or side is None or side % size:
        return resize(image, size, method)
    k = side // size
    batched = image if image.shape.rank == 4 else image[None]
    out = tf.nn.avg_pool2d(batched, k, k, "VALID")  # means of values in [0, 1]: no clip needed
    return out if image.shape.rank == 4 else out[0]


def _offset(seed: tf.Tensor, limit: tf.Tensor, training: bool) -> tf.Tensor:
    """Random offset in [0, limit] in training, the centre otherwise."""
    if not training:
        return limit // 2
    return tf.random.stateless_uniform([], seed, 0, limit + 1, dtype=tf.int32)


def _crop(image: tf.Tensor, oy: tf.Tensor, ox: tf.Tensor, px: int) -> tf.Tensor:
    return tf.ensure_shape(image[oy : oy + px, ox : ox + px, :], [px, px, 3])


def _to_float(image: tf.Tensor) -> tf.Tensor:
    return tf.image.convert_image_dtype(image, tf.float32)  # uint8 -> [0, 1]


def _one_view(example, seed, hr_px, lr_px, factor, lr_method, preset, training):
    """(hr, lr) from one seed: crop once, augment once, then make the LR view."""
    s_y, s_x, s_aug = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    image = example["image"]
    tile = tf.shape(image)[0]
    if lr_method == "pyramid":
        small = example["lr_image"]
        tile_lr = tf.shape(small)[0]
        ly = _offset(s_y, tile_lr - lr_px, training)
        lx = _offset(s_x, tile_lr - lr_px, training)
        # The HR crop starts at the level-0 position of the LR crop, kept inside the tile.
        oy = tf.minimum(tf.cast(tf.round(tf.cast(ly, tf.float32) * factor), tf.int32), tile - hr_px)
        ox = tf.minimum(tf.cast(tf.round(tf.cast(lx, tf.float32) * factor), tf.int32), tile - hr_px)
        hr = aug.augment(_to_float(_crop(image, oy, ox, hr_px)), s_aug, preset)
        lr = aug.augment(_to_float(_crop(small, ly, lx, lr_px)), s_aug, preset)
        return hr, lr
    oy = _offset(s_y, tile - hr_px, training)
    ox = _offset(s_x, tile - hr_px, training)
    hr = aug.augment(_to_float(_crop(image, oy, ox, hr_px)), s_aug, preset)
    return hr, resize(hr, lr_px, lr_method)


def make_views(
    example: dict,
    seed: tf.Tensor,
    *,
    hr_px: int,
    factor: float,
    lr_method: str = "area",
    preset: str = "none",
    training: bool = True,
) -> dict:
    """Turns one decoded example into the batch-element dict of the pipeline contract.

    Args:
      example: dict from :func:`kd_histo.data.decode.decode_record` ("image" uint8 [T, T, 3],
        "lr_image" when ``lr_method="pyramid"``, label/slide_id/x/y/source).
      seed: stateless seed, shape [2]; the only source of randomness.
      hr_px: side of the ``hr`` view (<= tile side).
      factor: resolution factor; ``lr`` is ``lr_size(hr_px, factor)`` pixels.
      lr_method: "area" | "bicubic" | "bilinear" | "pyramid".
      preset: augmentation preset (:data:`kd_histo.data.augment.PRESETS`).
      training: random crop when True, centre crop when False.

    Returns:
      {"hr", "lr", "label", "slide_id", "x", "y", "source"}; images float32 in [0, 1].
    """
    if lr_method not in LR_METHODS:
        raise ValueError(f"lr_method {lr_method!r} unknown; choose one of {LR_METHODS}")
    lr_px = lr_size(hr_px, factor)
    seed = tf.cast(seed, tf.int64)
    # The first of two split seeds: the draws every run so far was made with.
    s_main = tf.random.experimental.stateless_split(seed, 2)[0]
    hr, lr = _one_view(example, s_main, hr_px, lr_px, factor, lr_method, preset, training)
    out = {"hr": hr, "lr": lr}
    for key in ("label", "slide_id", "x", "y", "source"):
        out[key] = example[key]
    return out
