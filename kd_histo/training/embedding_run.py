"""A run distilling an embedding-only teacher: its checks, its losses, and its linear heads.

The student learns the teacher's embedding label-free (:class:`kd_histo.training.embedding.
EmbeddingKD`, plus cross-entropy only when ``--ce_weight`` asks), so its classifier head is never
trained during distillation and the best epoch is picked by the validation loss (the embedding
loss on the val tiles), not by an accuracy. After training, :func:`fit_heads` fits a linear head
(multinomial logistic regression, :func:`fit_linear_head`) on the labeled train tiles on the
student's frozen pooled features and writes it into the student as its ``head`` layer, so the
saved ``model.keras`` is the plain net (same outputs, same FLOPs); for comparison it fits a
linear probe on the teacher's embedding of the same tiles (HR view), saved beside as
``teacher_probe.npz``. Both accuracies (train tiles and val tiles) go into the run record
(:class:`kd_histo.training.probe_record.LinearProbe`).

Not here: the loss (``kd_histo.training.embedding``), measuring the heads on a test split
(``kd_histo.evaluation.probes``).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import keras
import numpy as np
import tensorflow as tf

from kd_histo import atomic
from kd_histo.data.pipeline import make_dataset
from kd_histo.training import foreign, preflight
from kd_histo.training import losses as L
from kd_histo.training.config import RunConfig
from kd_histo.training.distiller import ResolutionDistiller
from kd_histo.training.embedding import EmbeddingKD, pooled
from kd_histo.training.probe_record import TEACHER_PROBE_FILE, LinearProbe

_LOG = logging.getLogger(__name__)
PROBE_STEPS = 300  # full-batch Adam steps of a linear head (converges on standardised features)
PROBE_LEARNING_RATE = 0.05
PROBE_WEIGHT_DECAY = 1e-4  # on the standardised-feature weights: keeps separable data finite
_BATCH = 64


def embedding_teacher(cfg: RunConfig) -> bool:
    """Whether a distill run's teacher is (or an ensemble holds) an embedding-only foreign one."""
    if cfg.mode != "distill":
        return False
    try:
        return any(
            foreign.is_foreign(t) and not foreign.read_teacher_json(t).logits
            for t in cfg.distill.teachers
        )
    except foreign.ForeignTeacherError as e:
        raise preflight.PreflightError(f"teacher: {e}") from None


def prepare(cfg: RunConfig, log=_LOG.info) -> RunConfig:
    """``cfg`` as an embedding-only teacher's run trains it (others unchanged): refuses what it
    cannot do in one line, and picks the best epoch by ``val_loss`` (its head is fit after).

    Raises:
      PreflightError: an ensemble member, a teacher cache, or no labeled train tiles.
    """
    if not embedding_teacher(cfg):
        return cfg
    where = foreign.teacher_json(cfg.distill.teachers[0])
    if len(cfg.distill.teachers) > 1:
        raise preflight.PreflightError(
            "an embedding-only teacher (teacher.json without logits) cannot be an ensemble "
            "member: its members' probabilities are averaged; pass it alone as --teacher"
        )
    if cfg.distill.teacher_cache:
        raise preflight.PreflightError(
            f"the embedding-only teacher of {where} runs on every batch (a teacher cache holds "
            "logits and feature maps): drop --teacher_cache"
        )
    if not cfg.data.labeled or cfg.data.unlabeled_ratio >= 1.0:
        raise preflight.PreflightError(
            f"the student of the embedding-only teacher of {where} gets its linear head from "
            "the labeled train tiles: drop --nolabeled / use --unlabeled_ratio < 1"
        )
    if cfg.monitor == "val_accuracy":
        log("embedding-only teacher: the best epoch is the lowest val_loss (the head is fit after)")
        cfg = dataclasses.replace(cfg, monitor="val_loss")
    return cfg


def distiller(net: keras.Model, teacher: keras.Model, distill) -> ResolutionDistiller:
    """The student's distiller: the embedding loss, and cross-entropy at ``ce_weight`` (0 by
    default: label-free, and the classifier ``head``, fit after, is frozen meanwhile)."""
    if distill.ce_weight == 0:
        net.get_layer("head").trainable = False
    terms = [(1.0, EmbeddingKD(distill.embedding_loss)), (distill.ce_weight, L.MaskedCE())]
    return ResolutionDistiller(net, teacher, terms, accumulation_steps=distill.accumulation_steps)


def fit_linear_head(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    steps: int = PROBE_STEPS,
    learning_rate: float = PROBE_LEARNING_RATE,
    weight_decay: float = PROBE_WEIGHT_DECAY,
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression of labels ``y`` [N] on features ``x`` [N, D].

    Fit by full-batch Adam from zero weights on standardised features (deterministic), with an L2
    penalty on those weights; the standardisation is folded back, so the head reads raw
    features: ``logits = x @ kernel + bias``.

    Returns:
      (kernel [D, C], bias [C]) float32.
    """
    x = np.asarray(x, np.float64)
    mu, sd = x.mean(0), x.std(0)
    sd = np.where(sd > 1e-6, sd, 1.0)
    z = tf.constant((x - mu) / sd, tf.float32)
    labels = tf.constant(np.asarray(y, np.int32))
    w = tf.Variable(tf.zeros((x.shape[1], num_classes)))
    b = tf.Variable(tf.zeros((num_classes,)))
    opt = keras.optimizers.Adam(learning_rate)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logits = tf.matmul(z, w) + b
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
            loss = tf.reduce_mean(ce) + weight_decay * tf.reduce_sum(tf.square(w))
        opt.apply_gradients(zip(tape.gradient(loss, [w, b]), [w, b]))

    for _ in range(steps):
        step()
    kernel = w.numpy() / sd[:, None]
    bias = b.numpy() - (mu / sd) @ w.numpy()
    return kernel.astype(np.float32), bias.astype(np.float32)


def accuracy(x: np.ndarray, y: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> float:
    """Accuracy of the linear head ``x @ kernel + bias`` on labels ``y``."""
    return float(np.mean(np.argmax(x @ kernel + bias, axis=1) == y)) if len(y) else float("nan")


def write_head(net: keras.Model, kernel: np.ndarray, bias: np.ndarray) -> None:
    """Writes a linear head into the net's classifier layer ``head`` (shapes must fit) and makes
    it trainable again (a saved student fine-tunes as any other)."""
    head = net.get_layer("head")
    if tuple(head.kernel.shape) != kernel.shape or tuple(head.bias.shape) != bias.shape:
        raise ValueError(
            f"a head of kernel {kernel.shape} does not fit the net's {tuple(head.kernel.shape)}"
        )
    head.kernel.assign(kernel)
    head.bias.assign(bias)
    head.trainable = True  # frozen while the student learned the embedding


def split_features(cfg: RunConfig, net, teacher, split: str):
    """(student pooled features, teacher embeddings, labels) of the labeled tiles of ``split``,
    in file order without augmentation: the student reads the LR view, the teacher the HR one."""
    plain = dataclasses.replace(
        cfg.data, batch_size=_BATCH, normalize=False, cache=False, labeled=True
    )
    s, t, y = [], [], []
    for batch in make_dataset(plain, split, training=False):
        keep = np.asarray(batch["label"]).reshape(-1) >= 0
        if not keep.any():
            continue
        s.append(pooled(net(batch["lr"], training=False)["features"]).numpy()[keep])
        t.append(pooled(teacher(batch["hr"], training=False)["features"]).numpy()[keep])
        y.append(np.asarray(batch["label"]).reshape(-1)[keep])
    if not y:
        return np.zeros((0, 0)), np.zeros((0, 0)), np.zeros((0,), np.int64)
    return np.concatenate(s), np.concatenate(t), np.concatenate(y)


def fit_heads(cfg: RunConfig, net, info, has_val: bool, model_dir: str, log=_LOG.info):
    """Fits the student's head (written into ``net``) and the teacher's linear probe (saved as
    ``teacher_probe.npz`` in ``model_dir``) on the labeled train tiles; returns the
    :class:`LinearProbe` of both.

    Raises:
      PreflightError: the train split holds fewer than two classes of labeled tiles.
    """
    teacher = preflight.load_teacher(cfg, info)
    xs, xt, y = split_features(cfg, net, teacher, "train")
    if len(np.unique(y)) < 2:
        raise preflight.PreflightError(
            f"{cfg.data.data_dir}: the linear heads need labeled train tiles of two classes or "
            f"more, found {len(y)} tiles of {len(np.unique(y))}"
        )
    ks, bs = fit_linear_head(xs, y, info.num_classes)
    kt, bt = fit_linear_head(xt, y, info.num_classes)
    write_head(net, ks, bs)
    with atomic.replacing(os.path.join(model_dir, TEACHER_PROBE_FILE), ".tmp.npz") as tmp:
        np.savez(tmp, kernel=kt, bias=bt)
    probe = LinearProbe(
        teacher=os.path.abspath(cfg.distill.teachers[0]),
        embedding_loss=cfg.distill.embedding_loss,
        train_tiles=len(y),
        steps=PROBE_STEPS,
        student_train_accuracy=accuracy(xs, y, ks, bs),
        teacher_train_accuracy=accuracy(xt, y, kt, bt),
    )
    if has_val:
        vs, vt, vy = split_features(cfg, net, teacher, "val")
        if len(vy):
            probe = dataclasses.replace(
                probe,
                val_tiles=len(vy),
                student_val_accuracy=accuracy(vs, vy, ks, bs),
                teacher_val_accuracy=accuracy(vt, vy, kt, bt),
            )
    log(
        f"linear heads on {probe.train_tiles} train tiles: student "
        f"{probe.student_train_accuracy:.4f}, teacher probe {probe.teacher_train_accuracy:.4f}"
        + (
            f"; val: student {probe.student_val_accuracy:.4f}, teacher probe "
            f"{probe.teacher_val_accuracy:.4f}"
            if probe.student_val_accuracy is not None
            else ""
        )
    )
    return probe
