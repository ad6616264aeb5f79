"""Per-tile augmentations as stateless TensorFlow ops, and the named presets of the pipeline.

Every op takes an image (float32 RGB in [0, 1], [H, W, 3]) and a stateless seed (shape [2]) and
is a pure function of both: the same seed gives the same result eagerly and inside ``tf.data``,
and the random draws never depend on the image size, so applying an op with one seed to a tile
and to its low-resolution twin gives the *same* flip, rotation and colour change on both.

Presets (``PRESETS``): ``none``; ``flips`` (horizontal/vertical flip + rot90, i.e. the 8
symmetries of the square, numbered 0..7 by :func:`dihedral`, the one definition the teacher
cache uses too); ``paper`` (flips + colour jitter brightness/contrast/saturation/hue
= 0.5/0.5/0.5/0.2, DiPalma et al. 2021, torchvision ``ColorJitter`` semantics); ``paper+hed``
(paper + HED stain jitter, :mod:`kd_histo.data.stain`); ``flips+hed_strong`` (flips + HED
jitter with Tellez et al. 2019's "HED-strong" scale, alpha in [0.8, 1.2] per stain, and
``paper+hed``'s offset, beta in [-0.05, 0.05]: in these HED units (optical density / ln 1e-6) an
offset of 0.2 would darken white to e^-2.8 = 6%; no other colour change, the jitter to pair with
a stain normalisation that undoes global colour shifts itself); ``flips+lab`` (flips + a random
Reinhard transfer of the stained pixels' l-alpha-beta statistics, :func:`random_lab_jitter`);
``flips+lab+hed_strong`` (flips, then the l-alpha-beta jitter, then the HED-strong jitter);
``randaugment`` (flips + 2
random ops from a colour/stain list at a fixed magnitude).

keras-cv where it fits: the RandAugment-style ops solarize, posterize, sharpness and
autocontrast are keras-cv 0.9's own layers, called through their ``augment_images(images,
transformations)`` with parameters drawn here statelessly (its ``Equalization`` is left out: its
step uses the smallest non-empty histogram bin where PIL and AutoAugment use the last one, so it
is not histogram equalisation; measured against Pillow in the tests). Calling the layers themselves
would
not do: they draw from a stateful ``SeedGenerator``, and two fresh ``RandAugment(seed=7)`` layers
give different outputs on the same batch (measured), which breaks "deterministic under a seed".
The colour jitter keeps torchvision's ``ColorJitter`` arithmetic (the paper's), which keras-cv's
``RandomColorJitter`` does not follow (additive brightness, other factor ranges). Geometric ops
other than the square's symmetries (free rotation, shear, translate) are left out: they would
need padding that histology tiles do not have.
"""

from __future__ import annotations

import functools

import keras_cv
import tensorflow as tf

from kd_histo.data import stain, stain_norm

PRESETS = (
    "none",
    "flips",
    "paper",
    "paper+hed",
    "flips+hed_strong",
    "flips+lab",
    "flips+lab+hed_strong",
    "randaugment",
)
PAPER_JITTER = (0.5, 0.5, 0.5, 0.2)  # brightness, contrast, saturation, hue
HED_STRONG_JITTER = (0.2, 0.05)  # sigma (Tellez et al. 2019, HED-strong), bias of random_hed
# random_lab_jitter's sigmas: each l-alpha-beta mean moves by N(0, 1) of the tile's own standard
# deviations of that channel, and each deviation scales by exp(N(0, 0.5)). Chosen before measuring;
# the NCT colours sit 2-3 of these sigmas out on l and beta (BUILD_NOTES, "Shift then shrink").
LAB_JITTER = (1.0, 0.5)


def _seeds(seed: tf.Tensor, n: int) -> list[tf.Tensor]:
    return tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), n))


# ITU-R 601 luma weights, as tf.image.rgb_to_grayscale; a multiply-and-sum is ~25% faster here
# than its tensordot (a [H*W, 3] x [3, 1] matmul).
_GRAY = (0.2989, 0.5870, 0.1140)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(image * tf.constant(_GRAY, image.dtype), axis=-1, keepdims=True)


NUM_DIHEDRAL = 8  # the symmetries of the square: 4 rotations, each with or without a flip


def dihedral(images: tf.Tensor, k) -> tf.Tensor:
    """Dihedral transform ``k`` (0..7) of [..., H, W, C] images: k >= 4 flips, then rot90 k % 4."""
    k = tf.convert_to_tensor(k, tf.int32)
    flipped = tf.cond(k >= 4, lambda: tf.reverse(images, axis=[-2]), lambda: images)
    return tf.image.rot90(flipped, k % 4)


def dihedral_per_example(images: tf.Tensor, ks: tf.Tensor) -> tf.Tensor:
    """Applies transform ``ks[i]`` to ``images[i]`` of a [B, H, W, C] batch (square images)."""
    all8 = tf.stack([dihedral(images, k) for k in range(NUM_DIHEDRAL)])  # [8, B, H, W, C]
    idx = tf.stack([tf.cast(ks, tf.int32), tf.range(tf.shape(images)[0])], axis=1)
    return tf.gather_nd(all8, idx)


def random_flip_rot(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """One of the 8 symmetries of the square (:func:`dihedral`): random flip, rot90 by k in 0..3."""
    s_flip, s_rot = _seeds(seed, 2)
    flip = tf.random.stateless_uniform([], s_flip) < 0.5
    k = tf.random.stateless_uniform([], s_rot, 0, 4, dtype=tf.int32)
    return dihedral(image, tf.where(flip, 4, 0) + k)


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


@functools.cache
def _kcv(name: str, **kwargs):
    """One keras-cv preprocessing layer, made once, float32 whatever the global dtype policy."""
    return getattr(keras_cv.layers, name)(value_range=(0.0, 1.0), dtype="float32", **kwargs)


def solarize(x: tf.Tensor, m: float) -> tf.Tensor:
    """Inverts pixels above ``1 - m/2`` (keras-cv ``Solarization``; m in [0, 1])."""
    t = {
        "additions": tf.zeros([1, 1, 1, 1]),
        "thresholds": tf.fill([1, 1, 1, 1], 255.0 * (1.0 - 0.5 * m)),
    }
    return _kcv("Solarization").augment_images(x[None], t)[0]


def posterize(x: tf.Tensor, m: float) -> tf.Tensor:
    """Keeps ``8 - round(4 m)`` bits per channel (keras-cv ``Posterization``)."""
    bits = 8 - round(4.0 * m)
    return _kcv("Posterization", bits=bits).augment_image(x)


def sharpness(x: tf.Tensor, enhance: tf.Tensor) -> tf.Tensor:
    """PIL-style sharpness: ``enhance`` > 1 sharpens, < 1 blurs (keras-cv ``RandomSharpness``).

    keras-cv blends ``x + t (smooth - x)`` with its 3x3 kernel; enhancement ``e`` is ``t = 1 - e``.
    """
    t = tf.reshape(1.0 - tf.cast(enhance, tf.float32), [1, 1, 1, 1])
    return _kcv("RandomSharpness", factor=1.0).augment_images(x[None], t)[0]


def autocontrast(x: tf.Tensor) -> tf.Tensor:
    """Stretches each channel to the full range (keras-cv ``AutoContrast``)."""
    return _kcv("AutoContrast").augment_images(x[None])[0]


def _rand_op(image: tf.Tensor, seed: tf.Tensor, m: float) -> tf.Tensor:
    """One RandAugment op, chosen and signed by ``seed``, at magnitude ``m``."""
    s_op, s_sign, s_hed = _seeds(seed, 3)
    op = tf.random.stateless_uniform([], s_op, 0, 10, dtype=tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], s_sign) < 0.5, -1.0, 1.0)
    one = tf.constant(1.0)
    branches = [
        lambda: image,
        lambda: adjust_color(image, one + sign * m, one, one, 0.0),
        lambda: adjust_color(image, one, one + sign * m, one, 0.0),
        lambda: adjust_color(image, one, one, one + sign * m, 0.0),
        lambda: adjust_color(image, one, one, one, sign * 0.5 * m),
        lambda: solarize(image, m),
        lambda: posterize(image, m),
        lambda: sharpness(image, one + sign * m),
        lambda: autocontrast(image),
        lambda: stain.random_hed(image, s_hed, sigma=0.1 * m, bias=0.1 * m),
    ]
    return tf.ensure_shape(tf.switch_case(op, branches), image.shape)


def random_augment(
    image: tf.Tensor, seed: tf.Tensor, num_ops: int = 2, magnitude: float = 0.5
) -> tf.Tensor:
    """RandAugment-style: ``num_ops`` ops drawn uniformly (with replacement), sign of each random.

    Ops: identity, brightness, contrast, saturation, hue, solarize, posterize, sharpness,
    autocontrast (these four from keras-cv), HED. ``magnitude`` in [0, 1] scales them
    (1 = brightness/contrast/saturation/sharpness x[0, 2], hue +-0.5 turn, solarize threshold
    0.5, posterize to 4 bits, HED +-0.1).
    """
    image = tf.convert_to_tensor(image, tf.float32)
    for s in _seeds(seed, num_ops):
        image = _rand_op(image, s, float(magnitude))
    return image


def random_lab_jitter(
    image: tf.Tensor, seed: tf.Tensor, mean_sigma: float = 1.0, std_sigma: float = 0.5
) -> tf.Tensor:
    """The tile's stained pixels moved to random nearby colour statistics (RandStainNA-like,
    Shen et al. 2022): a Reinhard transfer (:mod:`kd_histo.data.stain_norm`) from the l-alpha-beta
    mean ``m`` and deviation ``d`` of the stained pixels to ``m + N(0, mean_sigma) * d`` and
    ``d * exp(N(0, std_sigma))`` per channel. Background stays as it is; a tile with too few
    stained pixels is returned unchanged. On the HR tile before the LR view is made, it teaches a
    student the part of another lab's colours that normalising its LR view cannot undo."""
    s_mean, s_std = _seeds(seed, 2)
    z_mean = tf.random.stateless_normal([3], s_mean) * mean_sigma
    z_std = tf.random.stateless_normal([3], s_std) * std_sigma
    pixels = tf.reshape(image, [-1, 3])
    stained = stain_norm.reinhard_stained(pixels)

    def shift():
        mean, std = stain_norm.reinhard_stats(pixels, stained)
        lab = (stain_norm.rgb_to_lab(pixels) - mean) * tf.exp(z_std) + mean + z_mean * std
        out = tf.where(stained[:, None], stain_norm.lab_to_rgb(lab), pixels)
        return tf.reshape(out, tf.shape(image))

    enough = tf.reduce_sum(tf.cast(stained, tf.int32)) >= stain_norm.MIN_STAINED
    return tf.cond(enough, shift, lambda: image)


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
    if preset in ("flips+lab", "flips+lab+hed_strong"):
        image = random_lab_jitter(image, s_col, *LAB_JITTER)
    if preset in ("flips+hed_strong", "flips+lab+hed_strong"):
        image = stain.random_hed(image, s_hed, *HED_STRONG_JITTER)
    if preset == "randaugment":
        image = random_augment(image, s_col)
    return image
