"""The feature-map resizers of resolution distillation, as plain TF ops in float32.

Adaptive max-pool and bicubic resize are written with masks and matrix products: they work on
dynamic shapes, compile under XLA, and reproduce PyTorch's ``F.adaptive_max_pool2d`` /
``F.interpolate(mode="bicubic", align_corners=False)`` used by the paper's code.

Bicubic kernels differ between frameworks: ``tf.image.resize(method="bicubic")`` uses Keys' cubic
with ``a = -0.5`` and drops (renormalising) taps that fall outside the image, while PyTorch uses
``a = -0.75`` and replicates the border pixel. :func:`bicubic_resize` offers both (``style="torch"``
is the default, matching the paper); both are separable matmuls, so no ``ResizeBicubic`` kernel is
needed (it has none under XLA).

Not here: the losses that use them (``kd_histo.training.losses``).
"""

from __future__ import annotations

import tensorflow as tf

from kd_histo.settings import check_choice

BICUBIC_STYLES = ("torch", "tf")
BICUBIC_STYLE = "torch"  # PyTorch's kernel, as the paper's code
_NEG = -3.0e38  # fills masked-out positions before a max; finite so 0 * _NEG never makes NaN


def _f32(x) -> tf.Tensor:
    return tf.cast(x, tf.float32)


def _bins(in_size: tf.Tensor, out_size: tf.Tensor) -> tf.Tensor:
    """[out, in] mask of PyTorch's adaptive bins: floor(i*in/out) <= k < ceil((i+1)*in/out)."""
    i = tf.range(out_size)[:, None]
    k = tf.range(in_size)[None, :]
    start = (i * in_size) // out_size
    end = ((i + 1) * in_size + out_size - 1) // out_size
    return tf.logical_and(k >= start, k < end)


def adaptive_max_pool2d(x, size) -> tf.Tensor:
    """Adaptive max-pool of a [B, H, W, C] map to ``size`` = (h, w), exactly as PyTorch bins it.

    Output cell ``i`` covers rows ``floor(i*H/h)`` to ``ceil((i+1)*H/h) - 1``, so windows overlap
    when H is not a multiple of h. Implemented as a masked max over each axis (separable).

    Args:
      x: [B, H, W, C] tensor.
      size: (h, w) output size (ints or scalar tensors).

    Returns:
      [B, h, w, C] float32 tensor.
    """
    x = _f32(x)
    shape = tf.shape(x)
    mask_h = _bins(shape[1], size[0])  # [h, H]
    mask_w = _bins(shape[2], size[1])  # [w, W]
    # rows: [B, 1, H, W, C] vs mask [1, h, H, 1, 1] -> max over H
    y = tf.where(mask_h[None, :, :, None, None], x[:, None], _NEG)
    y = tf.reduce_max(y, axis=2)  # [B, h, W, C]
    y = tf.where(mask_w[None, None, :, :, None], y[:, :, None], _NEG)
    return tf.reduce_max(y, axis=3)  # [B, h, w, C]


def _cubic(t: tf.Tensor, a: float) -> tf.Tensor:
    """Keys' cubic convolution kernel at distance |t|."""
    t = tf.abs(t)
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = ((a * t - 5.0 * a) * t + 8.0 * a) * t - 4.0 * a
    return tf.where(t <= 1.0, near, tf.where(t < 2.0, far, tf.zeros_like(t)))


def bicubic_matrix(in_size, out_size, style: str = BICUBIC_STYLE) -> tf.Tensor:
    """[out, in] float32 interpolation matrix of a 1-D bicubic resize with half-pixel centres.

    Args:
      in_size: input length.
      out_size: output length.
      style: "torch" (a=-0.75, border replicated, as ``F.interpolate(align_corners=False)``) or
        "tf" (a=-0.5, outside taps dropped and weights renormalised, as ``tf.image.resize``).
    """
    check_choice("bicubic style", style, BICUBIC_STYLES)
    in_size = tf.cast(in_size, tf.int32)
    out_size = tf.cast(out_size, tf.int32)
    a = -0.75 if style == "torch" else -0.5
    scale = tf.cast(in_size, tf.float32) / tf.cast(out_size, tf.float32)
    src = (tf.cast(tf.range(out_size), tf.float32) + 0.5) * scale - 0.5  # [out]
    base = tf.floor(src)
    frac = src - base
    taps = tf.constant([-1.0, 0.0, 1.0, 2.0])
    weights = _cubic(frac[:, None] - taps[None, :], a)  # [out, 4]
    idx = tf.cast(base, tf.int32)[:, None] + tf.cast(taps, tf.int32)[None, :]  # [out, 4]
    if style == "tf":
        inside = tf.logical_and(idx >= 0, idx < in_size)
        weights = tf.where(inside, weights, 0.0)
        weights = weights / tf.reduce_sum(weights, axis=1, keepdims=True)
    idx = tf.clip_by_value(idx, 0, in_size - 1)
    # Taps that clamp onto the same border pixel add up, which is PyTorch's replicate padding.
    return tf.reduce_sum(tf.one_hot(idx, in_size, dtype=tf.float32) * weights[..., None], axis=1)


def bicubic_resize(x, size, style: str = BICUBIC_STYLE) -> tf.Tensor:
    """Bicubic resize of a [B, H, W, C] map to ``size`` = (h, w) as two matmuls (XLA-friendly).

    Args:
      x: [B, H, W, C] tensor.
      size: (h, w) output size.
      style: "torch" (default; PyTorch's a=-0.75, the paper's code) or "tf" (matches
        ``tf.image.resize(..., "bicubic")`` with a=-0.5).

    Returns:
      [B, h, w, C] float32 tensor.
    """
    x = _f32(x)
    shape = tf.shape(x)
    m_h = bicubic_matrix(shape[1], size[0], style)
    m_w = bicubic_matrix(shape[2], size[1], style)
    y = tf.einsum("oh,bhwc->bowc", m_h, x)
    return tf.einsum("pw,bowc->bopc", m_w, y)
