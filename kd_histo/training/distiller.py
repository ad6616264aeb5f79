"""ResolutionDistiller: one ``keras.Model`` training loop for teacher, baseline and student nets.

Batches are the pipeline's dicts (``"hr"``, ``"lr"``, ``"label"``, ...). The student
reads ``batch[student_view]``; a frozen teacher (``trainable = False``, always called with
``training=False``) reads ``batch[teacher_view]``. Without a teacher the model is plain supervised
training on ``student_view`` (teacher training on "hr", baseline training on "lr"); with one it
distils. The losses are a list of ``(weight, loss)`` pairs of
:class:`kd_histo.training.losses.ResolutionLoss` objects (KD on logits, feature map, CE, InfoNCE,
attention transfer); only those of weight > 0 are computed and logged. Layers a loss needs (the
feature loss's 1x1 projections when the nets' feature widths differ, InfoNCE's heads) are owned and
trained here, never by the student, so the saved student is the plain net. A batch
that carries ``"teacher_logits"``/``"teacher_features"`` (from
:mod:`kd_histo.training.teacher_cache`; the
features already resized to the student's map) skips the teacher forward pass and the resize; then
no teacher model is needed at all.

Design follows ``keras.distillation.Distiller`` (frozen teacher, losses as objects validated
against both nets' outputs at construction, one Mean tracker per active loss) without its
assumption that teacher and student share one input. Losses are
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

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from kd_histo.training import losses as L
from kd_histo.training.config import DistillConfig

CACHE_KEYS = ("teacher_logits", "teacher_features")
Losses = Sequence[tuple[float, L.ResolutionLoss]]


def losses_for(distill, **extra) -> list[tuple[float, L.ResolutionLoss]]:
    """The weighted losses of a :class:`kd_histo.training.config.DistillConfig`, weight 0 included.

    ``extra`` sets loss parameters that the config does not hold (``bicubic_style``, ``splits``:
    an ensemble teacher's member map widths, ``ssl_temperature``, ``projection_dim``); left out,
    the loss classes' defaults apply.
    """
    feature = {k: extra[k] for k in ("bicubic_style", "splits") if k in extra}
    renamed = (("ssl_temperature", "temperature"), ("projection_dim", "projection_dim"))
    ssl = {k2: extra[k] for k, k2 in renamed if k in extra}
    return [
        (distill.kd_weight, L.LogitsKD(distill.temperature)),
        (
            distill.feature_weight,
            L.FeatureMapKD(distill.feature_mode, distill.feature_norm, **feature),
        ),
        (distill.ce_weight, L.MaskedCE()),
        (distill.ssl_weight, L.InfoNCE(**ssl)),
        (distill.at_weight, L.AttentionTransfer()),
    ]


def _output_spec(net: keras.Model | None):
    """A net's symbolic outputs (shapes to validate losses against), None when it has none."""
    if net is None:
        return None
    try:
        return net.output
    except (AttributeError, ValueError):  # a subclassed net: losses are checked at the first step
        return None


def _replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


# Registered so a saved distiller (not only its student) reloads with safe_mode on.
@keras.saving.register_keras_serializable(package="kd_histo")
class ResolutionDistiller(keras.Model):
    """Trains ``student`` on one view with weighted losses, maybe against a frozen ``teacher``.

    Args:
      student: a kd_histo net (dict outputs ``logits``/``features``); the one that learns.
      teacher: a kd_histo net or None (supervised training, or teacher outputs from a cache).
      losses: ``[(weight, loss), ...]`` with :class:`kd_histo.training.losses.ResolutionLoss`
        objects (as ``keras.distillation.Distiller``'s losses and weights); those of weight 0 are
        dropped, the others are validated against both nets' outputs here and logged under their
        ``name``, with their weighted sum as ``loss``. None: the run config's default losses
        (KD + feature loss, ``losses_for(DistillConfig())``).
      student_view: batch key the student reads ("lr" or "hr").
      teacher_view: batch key the teacher reads.
      accumulation_steps: micro-batches per optimizer update (>= 1).
    """

    def __init__(
        self,
        student: keras.Model,
        teacher: keras.Model | None = None,
        losses: Losses | None = None,
        *,
        student_view: str = "lr",
        teacher_view: str = "hr",
        accumulation_steps: int = 1,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if losses is None:
            losses = losses_for(DistillConfig())
        if any(w < 0 for w, _ in losses):
            raise ValueError("loss weights must be >= 0")
        terms = [(float(w), loss) for w, loss in losses if w > 0]
        names = [loss.name for _, loss in terms]
        if not terms:
            raise ValueError("nothing to learn: every loss weight is 0")
        if len(set(names)) != len(names) or "loss" in names:
            raise ValueError(f"loss names must be unique and not 'loss', got {names}")
        if int(accumulation_steps) < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        self.student = student
        self.teacher = teacher
        self.student_view = student_view
        self.teacher_view = teacher_view
        self.accumulation_steps = int(accumulation_steps)
        if teacher is not None:
            teacher.trainable = False
        t_spec, s_spec = _output_spec(teacher), _output_spec(student)
        self.student_head = self.teacher_head = None
        for _, loss in terms:
            # e.g. InfoNCE's heads, the feature loss's projections (trained here, never exported)
            for attr, layer in loss.build(t_spec, s_spec).items():
                setattr(self, attr, layer)
            if s_spec is not None:  # a subclassed student is checked at the first step
                loss.validate_outputs(t_spec, s_spec)
        self.loss_terms = terms
        self.trackers = {n: keras.metrics.Mean(name=n) for n in ("loss", *names)}
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")
        self.built = True

    @property
    def loss_names(self) -> tuple[str, ...]:
        """The logged losses: the total ``loss`` and each active one."""
        return tuple(self.trackers)

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
        if all(k in batch for k in CACHE_KEYS):  # the cache holds each loss's teacher target
            return {"logits": batch["teacher_logits"], "features": batch["teacher_features"]}
        if self.teacher is None:
            return None
        return self.teacher(batch[self.teacher_view], training=False)

    def compute_losses(self, batch: dict, training: bool = False):
        """The active losses of one batch (float32 scalars), their weighted sum, the student's
        output.

        Args:
          batch: a pipeline batch dict; may carry cached teacher outputs.
          training: passed to the student (and to the losses' own layers).

        Returns:
          (dict of :attr:`loss_names` -> scalar, student outputs dict).
        """
        student_out = self.student(batch[self.student_view], training=training)
        teacher_out = self._teacher_outputs(batch)
        if teacher_out is None:
            missing = [loss.name for _, loss in self.loss_terms if loss.needs_teacher]
            if missing:  # raised while tracing, so the user sees it before any step runs
                raise ValueError(
                    f"nothing to learn from {', '.join(missing)}: no teacher and no cached teacher "
                    "outputs in the batch; pass a teacher, or train supervised with cross-entropy "
                    "alone (ce_weight > 0, the other weights 0)"
                )
        parts = {}
        for _, loss in self.loss_terms:
            if teacher_out is not None:
                loss.validate_outputs(teacher_out, student_out)  # static shapes, at trace time
            value = loss.compute_loss(teacher_out, student_out, batch=batch, training=training)
            parts[loss.name] = tf.cast(value, tf.float32)
        parts["loss"] = tf.add_n([w * parts[loss.name] for w, loss in self.loss_terms])
        return parts, student_out

    def _update_metrics(self, parts, batch, student_out):
        for name, tracker in self.trackers.items():  # the total and the active losses only
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
            "losses": [
                {"weight": w, "loss": keras.saving.serialize_keras_object(loss)}
                for w, loss in self.loss_terms
            ],
            "student_view": self.student_view,
            "teacher_view": self.teacher_view,
            "accumulation_steps": self.accumulation_steps,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        student = keras.saving.deserialize_keras_object(config.pop("student"))
        teacher = config.pop("teacher")
        teacher = keras.saving.deserialize_keras_object(teacher) if teacher is not None else None
        losses = [
            (e["weight"], keras.saving.deserialize_keras_object(e["loss"]))
            for e in config.pop("losses")
        ]
        return cls(student, teacher, losses, **config)
