"""Embedding-only teachers (issue 28, Deliver 2): a foundation model without a classifier head.

Its ``teacher.json`` names ``features`` and no ``logits``
(:func:`kd_histo.training.foreign.load_foreign` wraps it as a net of one output, ``features``:
the [B, D] embedding, a [B, h, w, D] map global-average pooled). The student learns label-free to
reproduce it: :class:`EmbeddingKD` takes the student's pooled last feature map through a learned
linear projection to D (a distiller-owned layer, ``embedding_projection``, like the feature
loss's 1x1 projections: trained with the student, never saved with it) and compares it with the
teacher's embedding by :func:`embedding_distance` (``--embedding_loss``: cosine or l2). The
student's classifier head is then fit on its frozen features
(:mod:`kd_histo.training.linear_probe`).

Not here: the linear heads (``kd_histo.training.linear_probe``), reading ``teacher.json``
(``kd_histo.training.foreign``).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from kd_histo.settings import check_choice
from kd_histo.training.losses import ResolutionLoss

EMBEDDING_LOSSES = ("cosine", "l2")
EMBEDDING_LOSS = "cosine"


def pooled(features) -> tf.Tensor:
    """A [B, D] embedding as it is, a [B, h, w, D] map averaged over h and w; float32."""
    x = tf.cast(features, tf.float32)
    return tf.reduce_mean(x, axis=[1, 2]) if len(x.shape) == 4 else x


def embedding_distance(student_emb, teacher_emb, kind: str = EMBEDDING_LOSS) -> tf.Tensor:
    """Distance of two [B, D] embeddings, averaged over the batch, float32.

    ``"cosine"``: ``mean_b (1 - cos(s_b, t_b))`` (0 when aligned, scale-free); ``"l2"``: the mean
    squared difference over batch and dimensions (the teacher's scale matters).
    """
    check_choice("embedding loss", kind, EMBEDDING_LOSSES)
    s, t = tf.cast(student_emb, tf.float32), tf.cast(teacher_emb, tf.float32)
    if kind == "l2":
        return tf.reduce_mean(tf.square(s - t))
    cos = tf.reduce_sum(tf.math.l2_normalize(s, -1) * tf.math.l2_normalize(t, -1), axis=-1)
    return tf.reduce_mean(1.0 - cos)


def is_embedding_net(net: keras.Model | None) -> bool:
    """Whether ``net`` is an embedding-only teacher (outputs ``features`` and no ``logits``)."""
    out = getattr(net, "output", None) if net is not None else None
    return isinstance(out, dict) and "logits" not in out and "features" in out


@keras.saving.register_keras_serializable(package="kd_histo")
class EmbeddingKD(ResolutionLoss):
    """The student's pooled map, projected to the teacher's width, against the teacher's
    embedding (:func:`embedding_distance`). The projection (``embedding_projection``, a Dense of
    the teacher's width) is built by :meth:`build` and owned by the distiller."""

    name = "embed_loss"

    def __init__(self, kind: str = EMBEDDING_LOSS):
        check_choice("embedding loss", kind, EMBEDDING_LOSSES)
        self.kind = kind
        self.projection = None

    def build(self, teacher_outputs, student_outputs):
        if teacher_outputs is None or student_outputs is None:
            raise ValueError(
                "an embedding teacher's loss needs the teacher and student nets to size its "
                "projection (no teacher cache)"
            )
        width = teacher_outputs["features"].shape[-1]
        self.projection = keras.layers.Dense(width, name="embedding_projection")
        self.projection.build((None, student_outputs["features"].shape[-1]))
        return {"embedding_projection": self.projection}

    def validate_outputs(self, teacher_outputs, student_outputs):
        if teacher_outputs is None:
            return
        rank = len(teacher_outputs["features"].shape)
        if rank not in (2, 4):
            raise ValueError(
                f"an embedding teacher outputs [B, D] or [B, h, w, D] features, got rank {rank}"
            )

    def compute_loss(self, teacher_outputs, student_outputs, batch=None, training=False, **kwargs):
        s = self.projection(pooled(student_outputs["features"]))
        return embedding_distance(s, pooled(teacher_outputs["features"]), self.kind)

    def get_config(self):
        return {"kind": self.kind}
