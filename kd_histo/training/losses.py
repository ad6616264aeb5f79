"""Losses of resolution distillation, as pure functions of tensors computed in float32.

Every function casts its inputs to float32 first, so the same code is exact under
``mixed_float16``/``mixed_bfloat16`` policies. The feature-map resizers (adaptive max-pool and
bicubic) are written as plain TF ops with masks and matrix products: they work on dynamic shapes,
compile under XLA, and reproduce PyTorch's ``F.adaptive_max_pool2d`` / ``F.interpolate(
mode="bicubic", align_corners=False)`` used by the paper's code.

Bicubic kernels differ between frameworks: ``tf.image.resize(method="bicubic")`` uses Keys' cubic
with ``a = -0.5`` and drops (renormalising) taps that fall outside the image, while PyTorch uses
``a = -0.75`` and replicates the border pixel. :func:`bicubic_resize` offers both (``style="torch"``
is the default, matching the paper); both are separable matmuls, so no ``ResizeBicubic`` kernel is
needed (it has none under XLA).

The module also provides small ``keras.distillation.DistillationLoss`` wrappers so these functions
plug into Keras' distillation interfaces. It does not hold weights: projection heads of the
contrastive term live in :mod:`kd_histo.training.distiller`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

FEATURE_MODES = ("maxpool", "bicubic", "maxpool+bicubic")
FEATURE_NORMS = ("l2", "l1")
BICUBIC_STYLES = ("torch", "tf")
_NEG = -3.0e38  # fills masked-out positions before a max; finite so 0 * _NEG never makes NaN


def _f32(x) -> tf.Tensor:
    return tf.cast(x, tf.float32)


def kd_kl(teacher_logits, student_logits, temperature: float = 4.0) -> tf.Tensor:
    """Soft-target distillation loss ``KL(softmax(z_t/T) || softmax(z_s/T)) * T^2``.

    Computed in log space (``log_softmax``) so large logits do not overflow; averaged over the
    batch like PyTorch's ``kl_div(reduction="batchmean")``.

    Args:
      teacher_logits: [B, C] teacher logits.
      student_logits: [B, C] student logits.
      temperature: softening temperature T > 0.

    Returns:
      A float32 scalar.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = _f32(teacher_logits) / temperature
    s = _f32(student_logits) / temperature
    log_p_t = tf.nn.log_softmax(t, axis=-1)
    log_p_s = tf.nn.log_softmax(s, axis=-1)
    kl = tf.reduce_sum(tf.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return tf.reduce_mean(kl) * (temperature**2)


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


def bicubic_matrix(in_size, out_size, style: str = "torch") -> tf.Tensor:
    """[out, in] float32 interpolation matrix of a 1-D bicubic resize with half-pixel centres.

    Args:
      in_size: input length.
      out_size: output length.
      style: "torch" (a=-0.75, border replicated, as ``F.interpolate(align_corners=False)``) or
        "tf" (a=-0.5, outside taps dropped and weights renormalised, as ``tf.image.resize``).
    """
    if style not in BICUBIC_STYLES:
        raise ValueError(f"bicubic style must be one of {BICUBIC_STYLES}, got {style!r}")
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


def bicubic_resize(x, size, style: str = "torch") -> tf.Tensor:
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


def resize_teacher_map(
    teacher_map, size, mode: str = "maxpool+bicubic", bicubic_style: str = "torch"
) -> tf.Tensor:
    """The feature target: the teacher's map brought to the student's spatial ``size``.

    ``"maxpool+bicubic"`` is the mean of the two resized targets (the authors' intent).
    """
    if mode not in FEATURE_MODES:
        raise ValueError(f"feature mode must be one of {FEATURE_MODES}, got {mode!r}")
    if mode == "maxpool":
        return adaptive_max_pool2d(teacher_map, size)
    if mode == "bicubic":
        return bicubic_resize(teacher_map, size, bicubic_style)
    return 0.5 * (
        adaptive_max_pool2d(teacher_map, size) + bicubic_resize(teacher_map, size, bicubic_style)
    )


def map_distance(student_map, target, norm: str = "l2") -> tf.Tensor:
    """Mean squared ("l2") or mean absolute ("l1") difference of two same-shaped maps, float32."""
    if norm not in FEATURE_NORMS:
        raise ValueError(f"feature norm must be one of {FEATURE_NORMS}, got {norm!r}")
    diff = _f32(student_map) - _f32(target)
    return tf.reduce_mean(tf.square(diff)) if norm == "l2" else tf.reduce_mean(tf.abs(diff))


def check_channels(student_map, teacher_map) -> None:
    """Raises ValueError when two [B, h, w, C] maps have different (static) channel counts."""
    cs, ct = student_map.shape[-1], teacher_map.shape[-1]
    if cs is not None and ct is not None and cs != ct:
        raise ValueError(
            f"feature maps differ in channels: student {cs}, teacher {ct}; build the student "
            "with the teacher's last-stage width (same `planes`) or disable the feature loss "
            "(feature_weight=0)"
        )


def feature_map_loss(
    student_map,
    teacher_map,
    mode: str = "maxpool+bicubic",
    norm: str = "l2",
    bicubic_style: str = "torch",
) -> tf.Tensor:
    """L2/L1 loss between the student's map and the teacher's map resized to the student's size.

    Args:
      student_map: [B, h, w, C] student features.
      teacher_map: [B, H, W, C] teacher features (any H, W).
      mode: "maxpool", "bicubic" or "maxpool+bicubic".
      norm: "l2" (mean squared error) or "l1" (mean absolute error).
      bicubic_style: see :func:`bicubic_resize`.

    Returns:
      A float32 scalar.

    Raises:
      ValueError: channel counts differ, or an unknown mode/norm.
    """
    check_channels(student_map, teacher_map)
    size = tf.shape(student_map)[1:3]
    target = resize_teacher_map(teacher_map, (size[0], size[1]), mode, bicubic_style)
    return map_distance(student_map, target, norm)


def masked_ce(labels, logits) -> tf.Tensor:
    """Cross-entropy averaged over labeled examples; label -1 is ignored; 0 when none is labeled.

    Args:
      labels: [B] integer class indices, -1 for unlabeled.
      logits: [B, C] logits.
    """
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    logits = _f32(logits)
    mask = labels >= 0
    safe = tf.where(mask, labels, 0)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe, logits=logits)
    ce = tf.where(mask, ce, 0.0)
    return tf.math.divide_no_nan(tf.reduce_sum(ce), tf.reduce_sum(tf.cast(mask, tf.float32)))


def info_nce(student_emb, teacher_emb, temperature: float = 0.1) -> tf.Tensor:
    """Contrastive InfoNCE: each student embedding must pick its own tile's teacher embedding.

    Embeddings are L2-normalised; the positives are the diagonal of the [B, B] cosine-similarity
    matrix divided by ``temperature``, the other tiles of the batch are the negatives.

    Args:
      student_emb: [B, D] student (LR) embeddings (after a projection head).
      teacher_emb: [B, D] teacher (HR) embeddings of the same tiles, in the same order.
      temperature: softmax temperature > 0.

    Returns:
      A float32 scalar (mean cross-entropy over the batch).
    """
    s = tf.math.l2_normalize(_f32(student_emb), axis=-1)
    t = tf.math.l2_normalize(_f32(teacher_emb), axis=-1)
    sim = tf.matmul(s, t, transpose_b=True) / temperature
    labels = tf.range(tf.shape(sim)[0])
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=sim))


def attention_map(feature_map, p: float = 2.0) -> tf.Tensor:
    """Zagoruyko & Komodakis attention: channel mean of |A|^p, flattened, L2-normalised."""
    a = tf.reduce_mean(tf.pow(tf.abs(_f32(feature_map)), p), axis=-1)
    a = tf.reshape(a, [tf.shape(a)[0], -1])
    return tf.math.l2_normalize(a, axis=-1)


def attention_transfer(student_map, teacher_map, p: float = 2.0) -> tf.Tensor:
    """Attention-transfer loss: mean squared distance of normalised attention maps.

    The teacher's map is first brought to the student's size by adaptive max-pool (channel counts
    may differ: attention sums them away). Mean over batch and positions, as the authors' code.
    """
    size = tf.shape(student_map)[1:3]
    teacher_map = adaptive_max_pool2d(teacher_map, (size[0], size[1]))
    return tf.reduce_mean(tf.square(attention_map(student_map, p) - attention_map(teacher_map, p)))


class LogitsKD(keras.distillation.DistillationLoss):
    """``keras.distillation`` interface over :func:`kd_kl` (outputs are the models' dicts)."""

    def __init__(self, temperature: float = 4.0):
        self.temperature = temperature

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        return kd_kl(teacher_outputs["logits"], student_outputs["logits"], self.temperature)

    def validate_outputs(self, teacher_outputs, student_outputs):
        if teacher_outputs["logits"].shape[-1] != student_outputs["logits"].shape[-1]:
            raise ValueError(
                f"teacher has {teacher_outputs['logits'].shape[-1]} classes, student "
                f"{student_outputs['logits'].shape[-1]}: build both for the same class list"
            )

    def get_config(self):
        return {"temperature": self.temperature}


class FeatureMapKD(keras.distillation.DistillationLoss):
    """``keras.distillation`` interface over :func:`feature_map_loss` (across resolutions)."""

    def __init__(
        self, mode: str = "maxpool+bicubic", norm: str = "l2", bicubic_style: str = "torch"
    ):
        if mode not in FEATURE_MODES:
            raise ValueError(f"feature mode must be one of {FEATURE_MODES}, got {mode!r}")
        if norm not in FEATURE_NORMS:
            raise ValueError(f"feature norm must be one of {FEATURE_NORMS}, got {norm!r}")
        self.mode, self.norm, self.bicubic_style = mode, norm, bicubic_style

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        return feature_map_loss(
            student_outputs["features"],
            teacher_outputs["features"],
            self.mode,
            self.norm,
            self.bicubic_style,
        )

    def validate_outputs(self, teacher_outputs, student_outputs):
        check_channels(student_outputs["features"], teacher_outputs["features"])

    def get_config(self):
        return {"mode": self.mode, "norm": self.norm, "bicubic_style": self.bicubic_style}
