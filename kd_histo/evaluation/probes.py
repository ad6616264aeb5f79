"""An embedding-only teacher's student on an evaluated split: its head against the teacher's probe.

The student of an embedding-only teacher got its classifier head by a linear fit on the labeled
train tiles, and the teacher a linear probe on its embedding of the same tiles
(:mod:`kd_histo.training.embedding_run`; the run record's ``linear_probe``). Evaluating the
student on a split also measures the teacher's probe there (the teacher on the split's HR tiles,
the probe's weights from the run folder), so the report compares the two heads on the same
tiles: :class:`ProbeEvaluation`, ``linear_probe`` in metrics.json.

Not here: fitting the heads (``kd_histo.training.embedding_run``).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from kd_histo.data.pipeline import make_dataset
from kd_histo.training import foreign
from kd_histo.training.embedding import pooled
from kd_histo.training.run_record import RunRecord

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ProbeEvaluation:
    """Both linear heads on one split (labeled tiles), and on the train tiles they were fit on.

    Attributes:
      split: the evaluated split.
      tiles: its labeled tiles.
      student_accuracy: the student (its fitted head) on them.
      teacher_accuracy: the teacher's linear probe on them; None when the teacher is not there.
      teacher: the embedding-only teacher.
      student_train_accuracy: the student's head on the train tiles (from the run record).
      teacher_train_accuracy: the teacher's probe on the train tiles.
      train_tiles: the labeled train tiles both were fit on.
    """

    split: str
    tiles: int
    student_accuracy: float
    teacher_accuracy: float | None
    teacher: str
    student_train_accuracy: float
    teacher_train_accuracy: float
    train_tiles: int


def evaluate_probes(
    run: RunRecord,
    model_dir: str,
    data_dir: str,
    split: str,
    student_accuracy: float,
    batch_size: int,
    log=_LOG.warning,
) -> ProbeEvaluation:
    """The student's head (``student_accuracy``, measured by the evaluation) and the teacher's
    probe on the labeled tiles of ``split`` (the teacher reads their HR view)."""
    probe = run.linear_probe
    teacher_acc, tiles = None, 0
    if os.path.exists(probe.teacher) and foreign.is_foreign(probe.teacher):
        spec = foreign.read_teacher_json(probe.teacher)
        teacher = foreign.load_foreign(probe.teacher, spec, run.num_classes)
        head = np.load(os.path.join(model_dir, os.path.basename(probe.teacher_head)))
        hits = 0
        for batch in make_dataset(run.pipeline_config(data_dir, batch_size), split, False):
            y = batch["label"].numpy().reshape(-1)
            emb = pooled(teacher(batch["hr"], training=False)["features"]).numpy()
            pred = np.argmax(emb @ head["kernel"] + head["bias"], axis=1)
            hits, tiles = hits + int((pred == y)[y >= 0].sum()), tiles + int((y >= 0).sum())
        teacher_acc = hits / tiles if tiles else None
    else:
        log(
            f"linear probe: the teacher {probe.teacher} is not there; its probe is not measured "
            f"on {split}"
        )
    return ProbeEvaluation(
        split=split,
        tiles=tiles,
        student_accuracy=float(student_accuracy),
        teacher_accuracy=teacher_acc,
        teacher=probe.teacher,
        student_train_accuracy=probe.student_train_accuracy,
        teacher_train_accuracy=probe.teacher_train_accuracy,
        train_tiles=probe.train_tiles,
    )
