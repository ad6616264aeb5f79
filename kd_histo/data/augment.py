"""Per-tile augmentations as stateless TensorFlow ops, and the named presets of the pipeline.

Every op takes an image (float32 RGB in [0, 1], [H, W, 3]) and a stateless seed (shape [2]) and
is a pure function of both: the same seed gives the same result eagerly and inside ``tf.data``,
and the random draws never depend on the image size, so applying an op with one seed to a tile
and to its low-resolution twin gives the *same* flip, rotation and colour change on both.

Presets (``PRESETS``): ``none``; ``flips`` (horizontal/vertical flip + rot90, i.e. the 8
symmetries of the square); ``paper`` (flips + colour jitter brightness/contrast/saturation/hue
= 0.5/0.5/0.5/0.2, DiPalma et al. 2021, torchvision ``ColorJitter`` semantics); ``paper+hed``
(paper + HED stain jitter, :mod:`kd_histo.data.stain`); ``randaugment`` (flips + 2 random ops
from a colour/stain list at a fixed magnitude).

Why not keras-cv layers here: keras-cv 0.9 layers draw from a stateful ``SeedGenerator``; two
fresh ``RandAugment(seed=7)`` layers give different outputs on the same batch (measured), so
they cannot meet "deterministic under a seed". The ops below follow the same definitions with
stateless draws. Geometric ops other than the square's symmetries (free rotation, shear,
translate) are left out: they would need padding that histology tiles do not have.
"""

from __future__ import annotations

import tensorflow as tf

from kd_histo.data import stain

PRESETS = ("none", "flips", "paper", "paper+hed", "randaugment")
PAPER_JITTER = (0.5, 0.5, 0.5, 0.2)  # brightness, contrast, saturation, hue


def _seeds(seed: tf.Tensor, n: int) -> list[tf.Tensor]:
    return tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), n))


# ITU-R 601 luma weights, as tf.image.rgb_to_grayscale; a multiply-and-sum is ~25% faster here
# than its tensordot (a [H*W, 3] x [3, 1] matmul).
_GRAY = (0.2989, 0.5870, 0.1140)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(image * tf.constant(_GRAY, image.dtype), axis=-1, keepdims=True)


def random_flip_rot(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """One of the 8 symmetries of the square: random left-right flip, then rot90 by k in 0..3."""
    s_flip, s_rot = _seeds(seed, 2)
    flip = tf.random.stateless_uniform([], s_flip) < 0.5
    k = tf.random.stateless_uniform([], s_rot, 0, 4, dtype=tf.int32)
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    return tf.image.rot90(image, k)


def adjust_color(
    image: tf.Tensor,
    brightness: tf.Tensor,
    contrast: tf.Tensor,
    saturation: tf.Tensor,
    hue: tf.Tensor,
) -> tf.Tensor:
    """torchvision ``ColorJitter`` arithmetic for given factors (deterministic, clipped to [0, 1]).

    brightness: ``x * b``; contrast: blend with the mean grey level, ``m + c (x - m)``;
    saturation: blend with the grey image; hue: shift by ``hue`` turns of the colour wheel.
    """
    x = tf.clip_by_value(image * brightness, 0.0, 1.0)
    mean = tf.reduce_mean(_grayscale(x))
    x = tf.clip_by_value(mean + contrast * (x - mean), 0.0, 1.0)
    gray = _grayscale(x)
    x = tf.clip_by_value(gray + saturation * (x - gray), 0.0, 1.0)
    x = tf.image.adjust_hue(x, hue)
    return tf.clip_by_value(x, 0.0, 1.0)


def random_color_jitter(
    image: tf.Tensor,
    seed: tf.Tensor,
    brightness: float = 0.5,
    contrast: float = 0.5,
    saturation: float = 0.5,
    hue: float = 0.2,
) -> tf.Tensor:
    """Colour jitter with factors ~ U[max(0, 1 - v), 1 + v] and hue ~ U[-hue, hue] (fixed order)."""
    sb, sc, ss, sh = _seeds(seed, 4)

    def factor(s, v):
        return tf.random.stateless_uniform([], s, max(0.0, 1.0 - v), 1.0 + v)

    return adjust_color(
        image,
        factor(sb, brightness),
        factor(sc, contrast),
        factor(ss, saturation),
        tf.random.stateless_uniform([], sh, -hue, hue),
    )


def _solarize(x, m):
    return tf.where(x < 1.0 - 0.5 * m, x, 1.0 - x)


def _posterize(x, m):
    levels = tf.round(256.0 / tf.pow(2.0, tf.round(4.0 * m)))  # 8 bits down to 4 bits at m = 1
    return tf.floor(x * (levels - 1) + 0.5) / (levels - 1)


def _sharpness(x, m):
    # Blend with a 3x3 smoothed copy (PIL's ImageEnhance.Sharpness kernel); factor > 1 sharpens.
    k = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(k[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], "SAME")[0]
    return tf.clip_by_value(smooth + (1.0 + m) * (x - smooth), 0.0, 1.0)


def _rand_op(image: tf.Tensor, seed: tf.Tensor, m: float) -> tf.Tensor:
    """One RandAugment op, chosen and signed by ``seed``, at magnitude ``m``."""
    s_op, s_sign, s_hed = _seeds(seed, 3)
    op = tf.random.stateless_uniform([], s_op, 0, 9, dtype=tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], s_sign) < 0.5, -1.0, 1.0)
    one = tf.constant(1.0)
    branches = [
        lambda: image,
        lambda: adjust_color(image, one + sign * m, one, one, 0.0),
        lambda: adjust_color(image, one, one + sign * m, one, 0.0),
        lambda: adjust_color(image, one, one, one + sign * m, 0.0),
        lambda: adjust_color(image, one, one, one, sign * 0.5 * m),
        lambda: _solarize(image, m),
        lambda: _posterize(image, m),
        lambda: _sharpness(image, sign * m),
        lambda: stain.random_hed(image, s_hed, sigma=0.1 * m, bias=0.1 * m),
    ]
    return tf.ensure_shape(tf.switch_case(op, branches), image.shape)


def random_augment(
    image: tf.Tensor, seed: tf.Tensor, num_ops: int = 2, magnitude: float = 0.5
) -> tf.Tensor:
    """RandAugment-style: ``num_ops`` ops drawn uniformly (with replacement), sign of each random.

    Ops: identity, brightness, contrast, saturation, hue, solarize, posterize, sharpness, HED.
    ``magnitude`` in [0, 1] scales all of them (1 = brightness/contrast/saturation x[0, 2],
    hue +-0.5 turn, solarize threshold 0.5, posterize to 4 bits, HED +-0.1).
    """
    image = tf.convert_to_tensor(image, tf.float32)
    for s in _seeds(seed, num_ops):
        image = _rand_op(image, s, float(magnitude))
    return image


def augment(image: tf.Tensor, seed: tf.Tensor, preset: str) -> tf.Tensor:
    """Applies a named preset (see ``PRESETS``) with one stateless seed.

    Args:
      image: float32 RGB in [0, 1], [H, W, 3].
      seed: stateless seed, shape [2].
      preset: one of ``PRESETS``.

    Returns:
      The augmented image, float32 in [0, 1], same shape.
    """
    if preset not in PRESETS:
        raise ValueError(f"augment preset {preset!r} unknown; choose one of {PRESETS}")
    image = tf.convert_to_tensor(image, tf.float32)
    if preset == "none":
        return image
    s_geo, s_col, s_hed = _seeds(seed, 3)
    image = random_flip_rot(image, s_geo)
    if preset in ("paper", "paper+hed"):
        image = random_color_jitter(image, s_col, *PAPER_JITTER)
    if preset == "paper+hed":
        image = stain.random_hed(image, s_hed)
    if preset == "randaugment":
        image = random_augment(image, s_col)
    return image
