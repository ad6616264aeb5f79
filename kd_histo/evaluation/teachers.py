"""The teacher a cascade re-scores tiles with: one teacher run, or an ensemble of several.

``--cascade_teacher=RUN_A,RUN_B`` scores with the members' mean probability
(:func:`kd_histo.training.ensemble.build_ensemble` at temperature 1); each member must fit the
student as a single teacher must (:func:`kd_histo.evaluation.cascade.check_pair`, the error naming
the member), and the ensemble's cost is the sum of its members' FLOPs.

Not here: the cascade's curve and files (``kd_histo.evaluation.cascade``, ``.evaluate``).
"""

from __future__ import annotations

import dataclasses

import keras

from kd_histo.evaluation.cascade import check_pair
from kd_histo.evaluation.cost import count_flops
from kd_histo.models import load_model
from kd_histo.training.ensemble import build_ensemble
from kd_histo.training.run_record import RunRecord, read_run_record


@dataclasses.dataclass(frozen=True)
class CascadeTeacher:
    """A loaded cascade teacher: the net scoring HR tiles, its input size and GFLOPs per tile."""

    model: keras.Model
    runs: tuple[str, ...]
    input_px: int
    gflops: float


def teacher_runs(spec: str) -> tuple[str, ...]:
    """The run folders of a ``--cascade_teacher`` value (comma-separated for an ensemble)."""
    return tuple(p.strip() for p in spec.split(",") if p.strip())


def check_teacher_runs(spec: str, student: RunRecord) -> tuple[RunRecord, ...]:
    """Each teacher run's record, checked to fit ``student`` (one line naming the member)."""
    runs = teacher_runs(spec)
    records = []
    for run in runs:
        record = read_run_record(run)
        try:
            check_pair(student, record)
        except ValueError as e:
            raise ValueError(f"{run}: {e}" if len(runs) > 1 else str(e)) from None
        records.append(record)
    return tuple(records)


def load_cascade_teacher(spec: str, records, num_classes: int, cost: bool = True) -> CascadeTeacher:
    """Loads the teacher runs of ``spec`` (records from :func:`check_teacher_runs`); several are
    scored as one ensemble whose cost is the sum of its members' (``cost=False``: not counted,
    NaN)."""
    runs = teacher_runs(spec)
    members = [
        load_model(r.model_path(run), expected_num_classes=num_classes)
        for run, r in zip(runs, records)
    ]
    gflops = (
        sum(count_flops(m, r.input_px) for m, r in zip(members, records)) / 1e9
        if cost
        else float("nan")
    )
    model = members[0] if len(members) == 1 else build_ensemble(members, runs, features=False)
    return CascadeTeacher(model, runs, records[0].input_px, gflops)


def load_teacher(spec: str, student: RunRecord):
    """(teacher net, its first member's record) for kd-histo-predict's ``--cascade_teacher``,
    checked to fit ``student``; several runs are one ensemble; None without one (``spec`` "")."""
    if not spec:
        return None
    records = check_teacher_runs(spec, student)
    return load_cascade_teacher(spec, records, student.num_classes, cost=False).model, records[0]
