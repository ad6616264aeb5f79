"""H&E stain jitter in HED space (Ruifrok-Johnston colour deconvolution) as TensorFlow ops.

RGB is turned into optical density, unmixed into haematoxylin / eosin / DAB concentrations with
the inverse of the Ruifrok & Johnston (2001) stain matrix (the same matrix and log convention as
``skimage.color.rgb2hed``), each concentration is scaled and shifted (Tellez et al. 2018:
``s' = s * alpha + beta``), and the result is mixed back to RGB. Everything is a pure function of
the image and a stateless seed, so it runs the same eagerly and inside ``tf.data``.

This module does not estimate per-slide stain vectors (Macenko / Vahadane normalisation); it
jitters around the fixed reference vectors.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# Rows: haematoxylin, eosin, DAB optical-density vectors (skimage.color.rgb_from_hed).
RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
# Intensities are floored at 1e-6 before the log (skimage's convention), so log(1e-6) scales OD.
_LOG_ADJUST = float(np.log(1e-6))


def rgb_to_hed(image: tf.Tensor) -> tf.Tensor:
    """RGB in [0, 1] (any leading dims, last dim 3) -> HED stain concentrations, float32."""
    rgb = tf.maximum(tf.cast(image, tf.float32), 1e-6)
    od = tf.math.log(rgb) / _LOG_ADJUST
    return tf.tensordot(od, tf.constant(HED_FROM_RGB, tf.float32), axes=1)


def hed_to_rgb(hed: tf.Tensor) -> tf.Tensor:
    """Inverse of :func:`rgb_to_hed`, clipped to [0, 1]."""
    log_rgb = tf.tensordot(hed * _LOG_ADJUST, tf.constant(RGB_FROM_HED, tf.float32), axes=1)
    return tf.clip_by_value(tf.exp(log_rgb), 0.0, 1.0)


def hed_transform(image: tf.Tensor, alpha: tf.Tensor, beta: tf.Tensor) -> tf.Tensor:
    """Scales and shifts each HED concentration: ``hed * alpha + beta`` (alpha, beta: [3]).

    Equal to ``hed_to_rgb(rgb_to_hed(image) * alpha + beta)``, computed with the three linear
    steps folded into one 3x3 matrix and one offset (one matmul per pixel instead of two; the
    tests check it against that composition). With ``alpha = 1`` and ``beta = 0`` it returns the
    input up to float error and the 1e-6 floor.
    """
    alpha = tf.cast(alpha, tf.float32)
    beta = tf.cast(beta, tf.float32)
    to_hed = tf.constant(HED_FROM_RGB, tf.float32)
    to_rgb = tf.constant(RGB_FROM_HED, tf.float32)
    # log(rgb') = (log(rgb) / L @ to_hed * alpha + beta) * L @ to_rgb, with L = log(1e-6).
    matrix = tf.matmul(to_hed * alpha[None, :], to_rgb)
    offset = tf.linalg.matvec(to_rgb, beta * _LOG_ADJUST, transpose_a=True)
    log_rgb = tf.math.log(tf.maximum(tf.cast(image, tf.float32), 1e-6))
    return tf.clip_by_value(tf.exp(tf.tensordot(log_rgb, matrix, axes=1) + offset), 0.0, 1.0)


def random_hed(
    image: tf.Tensor, seed: tf.Tensor, sigma: float = 0.05, bias: float = 0.05
) -> tf.Tensor:
    """Random HED jitter: alpha ~ U[1 - sigma, 1 + sigma], beta ~ U[-bias, bias] per stain.

    Args:
      image: float RGB in [0, 1], [H, W, 3].
      seed: int32/int64 shape [2] stateless seed; the draw depends only on the seed.
      sigma: half-width of the multiplicative jitter.
      bias: half-width of the additive jitter (in HED concentration units).

    Returns:
      The jittered image, float32 in [0, 1], same shape.
    """
    s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    alpha = tf.random.stateless_uniform([3], s1, 1.0 - sigma, 1.0 + sigma)
    beta = tf.random.stateless_uniform([3], s2, -bias, bias)
    return hed_transform(image, alpha, beta)
