"""ResolutionDistiller: one ``keras.Model`` training loop for teacher, baseline and student nets.

Batches are the pipeline's dicts (``"hr"``, ``"lr"``, ``"label"``, maybe ``"lr2"``). The student
reads ``batch[student_view]``; a frozen teacher (``trainable = False``, always called with
``training=False``) reads ``batch[teacher_view]``. Without a teacher the model is plain supervised
training on ``student_view`` (teacher training on "hr", baseline training on "lr"); with one it
distils (KD on logits + feature-map loss, optional CE, InfoNCE and attention transfer). A batch
that carries ``"teacher_logits"``/``"teacher_features"`` (from :mod:`kd_histo.training.teacher_cache`; the
features already resized to the student's map) skips the teacher forward pass and the resize; then
no teacher model is needed at all.

Design follows ``keras.distillation.Distiller`` (frozen teacher, losses as small objects, one Mean
tracker per loss) without its assumption that teacher and student share one input. Losses are
float32; the total is divided by the number of replicas (tf.distribute sums gradients) and passed
through ``optimizer.scale_loss`` (LossScaleOptimizer under ``mixed_float16``). Gradient
accumulation uses the Keras optimizer's own ``gradient_accumulation_steps``, set in ``compile``.
Under tf.distribute every loss is a mean over the replica's share of the batch; with equal shares
that is the global mean, except for the masked cross-entropy, which averages over each replica's
labeled examples (a slightly different weighting when replicas hold different labeled counts).

Multi-worker training: set ``TF_CONFIG`` on each worker (``{"cluster": {"worker": [host:port,
...]}, "task": {"type": "worker", "index": i}}``), create
``tf.distribute.MultiWorkerMirroredStrategy()`` before building anything, and build the nets, the
distiller and ``compile`` inside ``strategy.scope()``; ``fit`` then shards the dataset per worker.
This module does no I/O and reads no flags.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from kd_histo.models import num_classes_of
from kd_histo.training import losses as L

LOSS_NAMES = ("loss", "kd_loss", "feature_loss", "ce_loss", "ssl_loss", "at_loss")
CACHE_KEYS = ("teacher_logits", "teacher_features")


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


def _replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


# Registered so a saved distiller (not only its student) reloads with safe_mode on.
@keras.saving.register_keras_serializable(package="kd_histo")
class ResolutionDistiller(keras.Model):
    """Trains ``student`` on one view, optionally distilling a frozen ``teacher`` on another.

    Args:
      student: a kd_histo net (dict outputs ``logits``/``features``); the one that learns.
      teacher: a kd_histo net or None (supervised training only).
      student_view: batch key the student reads ("lr", "hr", "lr2").
      teacher_view: batch key the teacher reads.
      temperature: KD temperature T.
      kd_weight: weight of KL(teacher || student) * T^2.
      feature_weight: weight of the feature-map loss.
      feature_mode: "maxpool", "bicubic" or "maxpool+bicubic".
      feature_norm: "l2" or "l1".
      ce_weight: weight of cross-entropy on labeled examples (label -1 ignored).
      ssl_weight: weight of InfoNCE between projected student and teacher embeddings.
      at_weight: weight of attention transfer between the feature maps.
      ssl_temperature: InfoNCE temperature.
      accumulation_steps: micro-batches per optimizer update (>= 1).
      projection_dim: width of the InfoNCE projection heads.
      bicubic_style: "torch" (a=-0.75, the paper's code) or "tf" (a=-0.5).
    """

    def __init__(
        self,
        student: keras.Model,
        teacher: keras.Model | None = None,
        *,
        student_view: str = "lr",
        teacher_view: str = "hr",
        temperature: float = 4.0,
        kd_weight: float = 1.0,
        feature_weight: float = 1.0,
        feature_mode: str = "maxpool+bicubic",
        feature_norm: str = "l2",
        ce_weight: float = 0.0,
        ssl_weight: float = 0.0,
        at_weight: float = 0.0,
        ssl_temperature: float = 0.1,
        accumulation_steps: int = 1,
        projection_dim: int = 128,
        bicubic_style: str = "torch",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if temperature <= 0 or ssl_temperature <= 0:
            raise ValueError(f"temperatures must be > 0, got {temperature}, {ssl_temperature}")
        if min(kd_weight, feature_weight, ce_weight, ssl_weight, at_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        if int(accumulation_steps) < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        if feature_mode not in L.FEATURE_MODES or feature_norm not in L.FEATURE_NORMS:
            raise ValueError(
                f"feature_mode must be one of {L.FEATURE_MODES} and feature_norm one of "
                f"{L.FEATURE_NORMS}; got {feature_mode!r}, {feature_norm!r}"
            )
        self.student = student
        self.teacher = teacher
        self.student_view = student_view
        self.teacher_view = teacher_view
        self.temperature = float(temperature)
        self.ssl_temperature = float(ssl_temperature)
        self.kd_weight = float(kd_weight)
        self.feature_weight = float(feature_weight)
        self.ce_weight = float(ce_weight)
        self.ssl_weight = float(ssl_weight)
        self.at_weight = float(at_weight)
        self.feature_mode = feature_mode
        self.feature_norm = feature_norm
        self.bicubic_style = bicubic_style
        self.accumulation_steps = int(accumulation_steps)
        self.projection_dim = int(projection_dim)
        self.logits_kd = L.LogitsKD(temperature)
        self.feature_kd = L.FeatureMapKD(feature_mode, feature_norm, bicubic_style)
        if teacher is not None:
            self._check_teacher(student, teacher)
            teacher.trainable = False
        self.student_head = self.teacher_head = None
        if ssl_weight > 0:
            s_dim = student.output["features"].shape[-1]
            self.student_head = _projection_head(projection_dim, "student_proj")
            self.student_head.build((None, s_dim))
            self.teacher_head = _projection_head(projection_dim, "teacher_proj")
            t_dim = teacher.output["features"].shape[-1] if teacher is not None else s_dim
            self.teacher_head.build((None, t_dim))
        self.trackers = {n: keras.metrics.Mean(name=n) for n in LOSS_NAMES}
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")
        self.built = True

    def _check_teacher(self, student, teacher):
        ns, nt = num_classes_of(student), num_classes_of(teacher)
        if ns != nt:
            raise ValueError(
                f"teacher has {nt} classes but student has {ns}: build both for the same class list"
            )
        if self.feature_weight > 0:
            L.check_channels(student.output["features"], teacher.output["features"])

    # -- Keras plumbing -----------------------------------------------------------------------
    def compile(self, optimizer="adam", jit_compile="auto", **kwargs):
        """Compiles; sets the optimizer's gradient accumulation if ``accumulation_steps > 1``.

        Losses come from the distiller itself, so ``loss=`` is not accepted. ``jit_compile="auto"``
        means XLA on accelerators only: on CPU the XLA-compiled step measured 25-50% slower than
        TF's own kernels, with oneDNN on or off (benchmarks/bench_step.py, --jit_compile).
        """
        if "loss" in kwargs:
            raise ValueError(
                "ResolutionDistiller computes its own losses; do not pass loss= to compile"
            )
        if jit_compile == "auto":
            jit_compile = bool(
                tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU")
            )
        super().compile(optimizer=optimizer, jit_compile=jit_compile, **kwargs)
        if self.accumulation_steps > 1:
            inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)
            if inner.built and inner.gradient_accumulation_steps != self.accumulation_steps:
                raise ValueError(
                    "the optimizer is already built; pass a fresh optimizer to compile()"
                )
            inner.gradient_accumulation_steps = self.accumulation_steps

    def compile_from_config(self, config):
        """Recompiles a loaded distiller with its saved optimizer (Keras skips custom compiles)."""
        config = keras.saving.deserialize_keras_object(config)
        config.pop("loss", None)  # the distiller's losses are its own
        config.pop("loss_weights", None)
        self.compile(**config)
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras (TF trainer) all-reduces a sample batch here under a distribution strategy; that
        # fails for dict batches under MultiWorkerMirroredStrategy and for string fields
        # ("slide_id", "source"). Every variable of the distiller exists after __init__, so only
        # the optimizer needs building; extra compile metrics still take Keras' path.
        if self._compile_metrics is not None:
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trainable_variables)

    @property
    def metrics(self):
        return list(self.trackers.values()) + [self.accuracy_tracker]

    def call(self, inputs, training=False):
        """The student's outputs for ``inputs[student_view]`` (or a bare image tensor)."""
        x = inputs[self.student_view] if isinstance(inputs, dict) else inputs
        return self.student(x, training=training)

    # -- losses -------------------------------------------------------------------------------
    def _teacher_outputs(self, batch):
        if all(k in batch for k in CACHE_KEYS):
            return {"logits": batch["teacher_logits"], "features": batch["teacher_features"]}, True
        if self.teacher is None:
            return None, False
        return self.teacher(batch[self.teacher_view], training=False), False

    def compute_losses(self, batch: dict, training: bool = False):
        """All losses of one batch (float32 scalars) and the student's outputs.

        Args:
          batch: a pipeline batch dict; may carry cached teacher outputs.
          training: passed to the student.

        Returns:
          (dict of LOSS_NAMES -> scalar, student outputs dict).
        """
        student_out = self.student(batch[self.student_view], training=training)
        zero = tf.constant(0.0, tf.float32)
        parts = dict.fromkeys(LOSS_NAMES[1:], zero)
        teacher_out, cached = self._teacher_outputs(batch)
        if teacher_out is None and self.ce_weight == 0:
            # Raised while tracing, so the user sees it before any step runs.
            raise ValueError(
                "nothing to learn: no teacher and no cached teacher outputs in the batch, and "
                "ce_weight is 0; set ce_weight > 0 for supervised training or pass a teacher"
            )
        s_feat = student_out["features"]
        if teacher_out is not None:
            t_feat = teacher_out["features"]
            if self.kd_weight > 0:
                parts["kd_loss"] = self.logits_kd.compute_loss(teacher_out, student_out)
            if self.feature_weight > 0:
                # Cached features were resized to the student's map when the cache was written.
                parts["feature_loss"] = (
                    L.map_distance(s_feat, t_feat, self.feature_norm)
                    if cached
                    else self.feature_kd.compute_loss(teacher_out, student_out)
                )
            if self.at_weight > 0:
                parts["at_loss"] = L.attention_transfer(s_feat, t_feat)
            if self.ssl_weight > 0:
                # From a cache, t_feat is the resized map: its mean approximates the full map's.
                s_emb = self.student_head(tf.reduce_mean(s_feat, axis=[1, 2]), training=training)
                t_emb = self.teacher_head(
                    tf.reduce_mean(tf.cast(t_feat, s_feat.dtype), axis=[1, 2]), training=training
                )
                parts["ssl_loss"] = L.info_nce(s_emb, t_emb, self.ssl_temperature)
        if self.ce_weight > 0 and "label" in batch:
            parts["ce_loss"] = L.masked_ce(batch["label"], student_out["logits"])
        weights = {
            "kd_loss": self.kd_weight,
            "feature_loss": self.feature_weight,
            "ce_loss": self.ce_weight,
            "ssl_loss": self.ssl_weight,
            "at_loss": self.at_weight,
        }
        parts["loss"] = tf.add_n([weights[k] * v for k, v in parts.items()])
        return parts, student_out

    def _update_metrics(self, parts, batch, student_out):
        for name, tracker in self.trackers.items():
            tracker.update_state(parts[name])
        if "label" in batch:
            labels = tf.cast(tf.reshape(batch["label"], [-1]), tf.int32)
            pred = tf.argmax(student_out["logits"], axis=-1, output_type=tf.int32)
            labeled = tf.cast(labels >= 0, tf.float32)
            self.accuracy_tracker.update_state(
                tf.cast(tf.equal(pred, labels), tf.float32), sample_weight=labeled
            )
        logs = {m.name: m.result() for m in self.metrics}
        if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # Keras reduces logs across workers with reduce("MEAN", v, axis=0), which needs a
            # batch axis; the mean of [1]-vectors is the scalar every other strategy reports.
            logs = {k: tf.reshape(v, [1]) for k, v in logs.items()}
        return logs

    @staticmethod
    def _unpack(data):
        # fit(dataset_of_dicts) hands the dict itself; fit(x=dict) may wrap it as (x,).
        if isinstance(data, (tuple, list)):
            data = data[0]
        if not isinstance(data, dict):
            raise TypeError(
                "ResolutionDistiller expects batches as dicts of views ('hr', 'lr', 'label', ...)"
            )
        return data

    def train_step(self, data):
        batch = self._unpack(data)
        with tf.GradientTape() as tape:
            parts, student_out = self.compute_losses(batch, training=True)
            # tf.distribute sums replica gradients: divide so the update is the global mean.
            loss = parts["loss"] / tf.cast(_replicas(), tf.float32)
            loss = self.optimizer.scale_loss(loss)
        weights = self.trainable_weights
        grads = tape.gradient(loss, weights)
        self.optimizer.apply_gradients(zip(grads, weights))
        return self._update_metrics(parts, batch, student_out)

    def test_step(self, data):
        batch = self._unpack(data)
        parts, student_out = self.compute_losses(batch, training=False)
        return self._update_metrics(parts, batch, student_out)

    # -- serialization ------------------------------------------------------------------------
    def get_config(self):
        return {
            "name": self.name,
            "student": keras.saving.serialize_keras_object(self.student),
            "teacher": keras.saving.serialize_keras_object(self.teacher)
            if self.teacher is not None
            else None,
            "student_view": self.student_view,
            "teacher_view": self.teacher_view,
            "temperature": self.temperature,
            "kd_weight": self.kd_weight,
            "feature_weight": self.feature_weight,
            "feature_mode": self.feature_mode,
            "feature_norm": self.feature_norm,
            "ce_weight": self.ce_weight,
            "ssl_weight": self.ssl_weight,
            "at_weight": self.at_weight,
            "ssl_temperature": self.ssl_temperature,
            "accumulation_steps": self.accumulation_steps,
            "projection_dim": self.projection_dim,
            "bicubic_style": self.bicubic_style,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        student = keras.saving.deserialize_keras_object(config.pop("student"))
        teacher = config.pop("teacher")
        teacher = keras.saving.deserialize_keras_object(teacher) if teacher is not None else None
        return cls(student, teacher, **config)
