"""Losses of resolution distillation, as pure functions of tensors computed in float32.

Every function casts its inputs to float32 first, so the same code is exact under
``mixed_float16``/``mixed_bfloat16`` policies. The teacher's feature map is brought to the
student's size by the resizers of :mod:`kd_histo.training.map_resize` (adaptive max-pool and
bicubic, as the paper's PyTorch code).

Every term is also a loss object with ``keras.distillation.DistillationLoss``'s interface
(:class:`ResolutionLoss`): ``validate_model_compatibility``/``validate_outputs`` check the teacher
and student outputs when the distiller is built, ``compute_loss(teacher_outputs, student_outputs,
batch=..., training=...)`` returns a float32 scalar, ``name`` is its column in the logs. The
distiller takes a list of ``(weight, loss)`` pairs. Each loss parameter's default and check are
defined here, once (the run config takes its defaults from these constants and checks its values by
building the loss objects). Adding a loss: one subclass here plus its weight field in
``DistillConfig`` and one line in :func:`kd_histo.training.distiller.losses_for`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from kd_histo.settings import check_choice
from kd_histo.training.map_resize import (
    BICUBIC_STYLE,
    BICUBIC_STYLES,
    adaptive_max_pool2d,
    bicubic_resize,
)

FEATURE_MODES = ("maxpool", "bicubic", "maxpool+bicubic")
FEATURE_NORMS = ("l2", "l1")
KD_TEMPERATURE = 4.0  # the paper's T
FEATURE_MODE = "maxpool+bicubic"  # the authors' intent: mean of both resized targets
FEATURE_NORM = "l2"
SSL_TEMPERATURE = 0.1
PROJECTION_DIM = 128
AT_POWER = 2.0


def _f32(x) -> tf.Tensor:
    return tf.cast(x, tf.float32)


def check_temperature(name: str, value: float) -> None:
    """Raises ValueError unless a softmax temperature is > 0."""
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def kd_kl(teacher_logits, student_logits, temperature: float = KD_TEMPERATURE) -> tf.Tensor:
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
    check_temperature("temperature", temperature)
    t = _f32(teacher_logits) / temperature
    s = _f32(student_logits) / temperature
    log_p_t = tf.nn.log_softmax(t, axis=-1)
    log_p_s = tf.nn.log_softmax(s, axis=-1)
    kl = tf.reduce_sum(tf.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return tf.reduce_mean(kl) * (temperature**2)


def resize_teacher_map(
    teacher_map, size, mode: str = FEATURE_MODE, bicubic_style: str = BICUBIC_STYLE
) -> tf.Tensor:
    """The feature target: the teacher's map brought to the student's spatial ``size``.

    ``"maxpool+bicubic"`` is the mean of the two resized targets (the authors' intent). Every
    mode maps a map already of ``size`` to itself (one-cell max-pool bins; the cubic kernel is
    1 at distance 0 and 0 at distances 1 and 2), so a target resized once stays the target.
    """
    check_choice("feature mode", mode, FEATURE_MODES)
    if mode == "maxpool":
        return adaptive_max_pool2d(teacher_map, size)
    if mode == "bicubic":
        return bicubic_resize(teacher_map, size, bicubic_style)
    return 0.5 * (
        adaptive_max_pool2d(teacher_map, size) + bicubic_resize(teacher_map, size, bicubic_style)
    )


def map_distance(student_map, target, norm: str = FEATURE_NORM) -> tf.Tensor:
    """Mean squared ("l2") or mean absolute ("l1") difference of two same-shaped maps, float32."""
    check_choice("feature norm", norm, FEATURE_NORMS)
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
    mode: str = FEATURE_MODE,
    norm: str = FEATURE_NORM,
    bicubic_style: str = BICUBIC_STYLE,
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


def info_nce(student_emb, teacher_emb, temperature: float = SSL_TEMPERATURE) -> tf.Tensor:
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


def attention_map(feature_map, p: float = AT_POWER) -> tf.Tensor:
    """Zagoruyko & Komodakis attention: channel mean of |A|^p, flattened, L2-normalised."""
    a = tf.reduce_mean(tf.pow(tf.abs(_f32(feature_map)), p), axis=-1)
    a = tf.reshape(a, [tf.shape(a)[0], -1])
    return tf.math.l2_normalize(a, axis=-1)


def attention_transfer(student_map, teacher_map, p: float = AT_POWER) -> tf.Tensor:
    """Attention-transfer loss: mean squared distance of normalised attention maps.

    The teacher's map is first brought to the student's size by adaptive max-pool (channel counts
    may differ: attention sums them away). Mean over batch and positions, as the authors' code.
    """
    size = tf.shape(student_map)[1:3]
    teacher_map = adaptive_max_pool2d(teacher_map, (size[0], size[1]))
    return tf.reduce_mean(tf.square(attention_map(student_map, p) - attention_map(teacher_map, p)))


# -- loss objects ----------------------------------------------------------------------------------
class ResolutionLoss(keras.distillation.DistillationLoss):
    """One weighted term of the distiller, with ``keras.distillation.DistillationLoss``'s interface.

    Outputs are the nets' dicts (``logits`` [B, C], ``features`` [B, h, w, F]). The teacher's may
    come from a cache (:mod:`kd_histo.training.teacher_cache`) whose features are already this
    loss's target at the student's map size. Subclasses set ``name`` (the column in the logs) and
    ``needs_teacher``, and implement ``compute_loss``; ``validate_outputs`` gets the nets' symbolic
    outputs when the distiller is built (teacher outputs are None without a teacher), so a
    mismatch is a ValueError before any step. ``build`` returns layers the distiller must own
    and train (attribute name -> layer), e.g. projection heads.
    """

    name = "loss"
    needs_teacher = True

    def validate_model_compatibility(self, teacher, student):
        self.validate_outputs(teacher.output if teacher is not None else None, student.output)

    def validate_outputs(self, teacher_outputs, student_outputs):
        """Raises ValueError when the outputs cannot feed this loss (shapes are static ones)."""

    def build(self, teacher_outputs, student_outputs) -> dict[str, keras.layers.Layer]:
        return {}

    def compute_loss(self, teacher_outputs, student_outputs, batch=None, training=False, **kwargs):
        raise NotImplementedError

    def get_config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _register(cls):
    return keras.saving.register_keras_serializable(package="kd_histo")(cls)


@_register
class LogitsKD(ResolutionLoss):
    """Soft-target KD on logits, :func:`kd_kl` at ``temperature``."""

    name = "kd_loss"

    def __init__(self, temperature: float = KD_TEMPERATURE):
        check_temperature("temperature", temperature)
        self.temperature = float(temperature)

    def validate_outputs(self, teacher_outputs, student_outputs):
        if teacher_outputs is None:
            return
        nt, ns = teacher_outputs["logits"].shape[-1], student_outputs["logits"].shape[-1]
        if nt is not None and ns is not None and nt != ns:
            raise ValueError(
                f"teacher has {nt} classes but student has {ns}: build both for the same class list"
            )

    def compute_loss(self, teacher_outputs, student_outputs, batch=None, training=False, **kwargs):
        return kd_kl(teacher_outputs["logits"], student_outputs["logits"], self.temperature)

    def get_config(self):
        return {"temperature": self.temperature}


def feature_projection(width: int, name: str) -> keras.layers.Conv2D:
    """FitNets' regressor: a learned 1x1 convolution taking the student's map to ``width``
    channels. It lives in the distiller (trained with the student), never in the student net."""
    return keras.layers.Conv2D(width, 1, name=name)


@_register
class FeatureMapKD(ResolutionLoss):
    """Feature-map loss across resolutions: :func:`map_distance` to :meth:`target`.

    The teacher cache stores :meth:`target` of the teacher's map; as the resize maps a map of the
    student's size to itself, ``compute_loss`` skips it when the sizes already agree (statically).

    ``splits``: the channel widths of the parts of the teacher's map (an ensemble's members'
    maps, concatenated along channels; empty = one map). Each part gets its own learned 1x1
    projection of the student's map (:func:`feature_projection`, built by :meth:`build` and owned
    by the distiller as ``feature_projections``) and the loss is the mean of the parts' distances.
    A single map gets a projection only when its width differs from the student's, so a student
    of the teacher's width trains exactly as without projections.
    """

    name = "feature_loss"

    def __init__(
        self,
        mode: str = FEATURE_MODE,
        norm: str = FEATURE_NORM,
        bicubic_style: str = BICUBIC_STYLE,
        splits: tuple[int, ...] = (),
    ):
        check_choice("feature mode", mode, FEATURE_MODES)
        check_choice("feature norm", norm, FEATURE_NORMS)
        check_choice("bicubic style", bicubic_style, BICUBIC_STYLES)
        if any(int(c) < 1 for c in splits):
            raise ValueError(f"feature splits must be channel counts >= 1, got {splits}")
        self.mode, self.norm, self.bicubic_style = mode, norm, bicubic_style
        self.splits = tuple(int(c) for c in splits)
        self.projections: list = []

    def target(self, teacher_map, size) -> tf.Tensor:
        """The teacher's map resized to the student's map ``size`` (h, w), float32."""
        return resize_teacher_map(teacher_map, size, self.mode, self.bicubic_style)

    def _parts(self, teacher_map) -> tuple[int, ...]:
        ct = teacher_map.shape[-1]
        if self.splits and ct is not None and sum(self.splits) != ct:
            raise ValueError(
                f"the teacher's feature map has {ct} channels but its parts add up to "
                f"{sum(self.splits)} ({self.splits}): the teacher outputs do not fit this loss"
            )
        return self.splits or (ct,)

    def validate_outputs(self, teacher_outputs, student_outputs):
        if teacher_outputs is None:
            return
        parts = self._parts(teacher_outputs["features"])
        if self.projections:
            if [p.filters for p in self.projections] != list(parts):
                raise ValueError(
                    f"feature projections of widths {[p.filters for p in self.projections]} do "
                    f"not fit the teacher's map parts {list(parts)}"
                )
        elif len(parts) > 1:
            raise ValueError("an ensemble's feature maps need their projections: build() first")
        else:
            check_channels(student_outputs["features"], teacher_outputs["features"])

    def build(self, teacher_outputs, student_outputs):
        self.projections = []
        if teacher_outputs is None or student_outputs is None:
            return {}
        cs = student_outputs["features"].shape[-1]
        parts = self._parts(teacher_outputs["features"])
        if len(parts) == 1 and (parts[0] == cs or None in (cs, parts[0])):
            return {}  # same width (or unknown until traced): the plain loss, no projection
        for i, width in enumerate(parts):
            layer = feature_projection(width, f"feature_projection_{i}")
            layer.build((None, None, None, cs))
            self.projections.append(layer)
        return {"feature_projections": self.projections}

    def _distance(self, s, t) -> tf.Tensor:
        hw_s, hw_t = tf.TensorShape(s.shape[1:3]), tf.TensorShape(t.shape[1:3])
        if not (hw_s.is_fully_defined() and hw_s == hw_t):
            size = tf.shape(s)[1:3]
            t = self.target(t, (size[0], size[1]))
        return map_distance(s, t, self.norm)

    def compute_loss(self, teacher_outputs, student_outputs, batch=None, training=False, **kwargs):
        s, t = student_outputs["features"], teacher_outputs["features"]
        if not self.projections:
            check_channels(s, t)
            return self._distance(s, t)
        parts = self._parts(t)
        targets = tf.split(t, list(parts), axis=-1) if len(parts) > 1 else [t]
        distances = [self._distance(p(s), ti) for p, ti in zip(self.projections, targets)]
        return tf.add_n(distances) / float(len(distances))

    def get_config(self):
        out = {"mode": self.mode, "norm": self.norm, "bicubic_style": self.bicubic_style}
        if self.splits:  # configs saved before ensembles stay as they were
            out["splits"] = list(self.splits)
        return out


@_register
class MaskedCE(ResolutionLoss):
    """Cross-entropy on the batch's labeled examples (:func:`masked_ce`); 0 when it has none."""

    name = "ce_loss"
    needs_teacher = False

    def compute_loss(self, teacher_outputs, student_outputs, batch=None, training=False, **kwargs):
        if batch is None or "label" not in batch:
            return tf.constant(0.0, tf.float32)
        return masked_ce(batch["label"], student_outputs["logits"])


def _projection_head(dim: int, name: str) -> keras.Sequential:
    """SimCLR-style MLP head (Dense-ReLU-Dense) whose float32 output feeds InfoNCE."""
    return keras.Sequential(
        [
            keras.layers.Dense(dim, activation="relu", name=f"{name}_1"),
            keras.layers.Dense(dim, name=f"{name}_2"),
            keras.layers.Activation("linear", dtype="float32", name=f"{name}_f32"),
        ],
        name=name,
    )


@_register
class InfoNCE(ResolutionLoss):
    """Contrastive :func:`info_nce` between projected, pooled student and teacher features.

    Its projection heads are built by :meth:`build` and owned (tracked, trained, saved) by the
    distiller as ``student_head``/``teacher_head``. From a cache the teacher's map is the resized
    target: its mean approximates the full map's.
    """

    name = "ssl_loss"

    def __init__(self, temperature: float = SSL_TEMPERATURE, projection_dim: int = PROJECTION_DIM):
        check_temperature("ssl temperature", temperature)
        self.temperature, self.projection_dim = float(temperature), int(projection_dim)
        self.student_head = self.teacher_head = None

    def build(self, teacher_outputs, student_outputs):
        s_dim = student_outputs["features"].shape[-1]
        t_dim = teacher_outputs["features"].shape[-1] if teacher_outputs is not None else s_dim
        self.student_head = _projection_head(self.projection_dim, "student_proj")
        self.student_head.build((None, s_dim))
        self.teacher_head = _projection_head(self.projection_dim, "teacher_proj")
        self.teacher_head.build((None, t_dim))
        return {"student_head": self.student_head, "teacher_head": self.teacher_head}

    def compute_loss(self, teacher_outputs, student_outputs, batch=None, training=False, **kwargs):
        s_feat = student_outputs["features"]
        t_feat = tf.cast(teacher_outputs["features"], s_feat.dtype)
        s_emb = self.student_head(tf.reduce_mean(s_feat, axis=[1, 2]), training=training)
        t_emb = self.teacher_head(tf.reduce_mean(t_feat, axis=[1, 2]), training=training)
        return info_nce(s_emb, t_emb, self.temperature)

    def get_config(self):
        return {"temperature": self.temperature, "projection_dim": self.projection_dim}


@_register
class AttentionTransfer(ResolutionLoss):
    """Attention transfer between the feature maps (:func:`attention_transfer`)."""

    name = "at_loss"

    def __init__(self, p: float = AT_POWER):
        self.p = float(p)

    def compute_loss(self, teacher_outputs, student_outputs, batch=None, training=False, **kwargs):
        return attention_transfer(student_outputs["features"], teacher_outputs["features"], self.p)

    def get_config(self):
        return {"p": self.p}
