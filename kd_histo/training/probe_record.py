"""The linear heads of an embedding-only teacher's student, as its run record holds them.

After a student learned an embedding-only teacher's embedding (label-free), a linear head is fit
on the labeled train tiles on the student's frozen pooled features (and written into the student
as its ``head``), and, for comparison, a linear probe on the teacher's embedding
(:mod:`kd_histo.training.embedding_run`). :class:`LinearProbe` is what ``run.json`` says of both
(its ``linear_probe``); the teacher probe's weights lie in the run folder (``teacher_head``).

Not here: fitting the heads (``kd_histo.training.embedding_run``), measuring them on a split
(``kd_histo.evaluation.probes``).
"""

from __future__ import annotations

import dataclasses

TEACHER_PROBE_FILE = "teacher_probe.npz"


@dataclasses.dataclass(frozen=True)
class LinearProbe:
    """Both linear heads of an embedding teacher's student run.

    Attributes:
      teacher: the embedding-only teacher (its SavedModel folder or model file).
      embedding_loss: the loss the student learned the embedding with ("cosine" or "l2").
      train_tiles: labeled train tiles both heads were fit on.
      steps: full-batch optimisation steps of each fit.
      student_train_accuracy: the student's head on those tiles (its LR view).
      teacher_train_accuracy: the teacher's probe on those tiles (their HR view).
      val_tiles: labeled val tiles both heads were measured on (0: no val split).
      student_val_accuracy: the student's head on them (None without a val split).
      teacher_val_accuracy: the teacher's probe on them.
      teacher_head: the teacher probe's weights (``kernel`` [D, C], ``bias`` [C], an .npz in the
        run folder).
    """

    teacher: str
    embedding_loss: str
    train_tiles: int
    steps: int
    student_train_accuracy: float
    teacher_train_accuracy: float
    val_tiles: int = 0
    student_val_accuracy: float | None = None
    teacher_val_accuracy: float | None = None
    teacher_head: str = TEACHER_PROBE_FILE
