"""The teacher a cascade re-scores tiles with: one teacher run, or an ensemble of several.

A teacher is a kd_histo teacher run, or a model from elsewhere with a ``teacher.json`` that names
its logits (:mod:`kd_histo.training.foreign`; checked as a run's record).
``--cascade_teacher=RUN_A,RUN_B`` scores with the members' mean probability
(:func:`kd_histo.training.ensemble.build_ensemble` at temperature 1); each member must fit the
student as a single teacher must (:func:`kd_histo.evaluation.cascade.check_pair`, the error naming
the member), and the ensemble's cost is the sum of its members' FLOPs.

Not here: the cascade's curve and files (``kd_histo.evaluation.cascade``, ``.evaluate``).
"""

from __future__ import annotations

import dataclasses
import os

import keras

from kd_histo.evaluation.cascade import check_pair
from kd_histo.evaluation.cost import count_flops
from kd_histo.models import load_model
from kd_histo.training import foreign
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


def _record(run: str) -> RunRecord:
    """A teacher's record: its run.json, or a foreign model's ``teacher.json``
    (:mod:`kd_histo.training.foreign`), which must name logits to score tiles with."""
    if not foreign.is_foreign(run):
        return read_run_record(run)
    spec = foreign.read_teacher_json(run)
    if not spec.logits:
        raise ValueError(
            f"{foreign.teacher_json(run)}: an embedding-only teacher has no logits to re-score "
            "tiles with; a cascade teacher needs a classifier (name its logits output)"
        )
    return foreign.record_of(spec)


def check_teacher_runs(spec: str, student: RunRecord) -> tuple[RunRecord, ...]:
    """Each teacher's record (a run's, or a foreign model's ``teacher.json``), checked to fit
    ``student`` (one line naming the member, or the ``teacher.json``)."""
    runs = teacher_runs(spec)
    records = []
    for run in runs:
        record = _record(run)
        try:
            check_pair(student, record)
        except ValueError as e:
            named = foreign.teacher_json(run) if foreign.is_foreign(run) else run
            raise ValueError(
                f"{named}: {e}" if len(runs) > 1 or foreign.is_foreign(run) else str(e)
            ) from None
        records.append(record)
    return tuple(records)


def _load(run: str, record: RunRecord, num_classes: int) -> keras.Model:
    if foreign.is_foreign(run):
        return foreign.load_foreign(run, foreign.read_teacher_json(run), num_classes)
    return load_model(record.model_path(run), expected_num_classes=num_classes)


def load_cascade_teacher(spec: str, records, num_classes: int, cost: bool = True) -> CascadeTeacher:
    """Loads the teacher runs of ``spec`` (records from :func:`check_teacher_runs`); several are
    scored as one ensemble whose cost is the sum of its members' (``cost=False``: not counted,
    NaN)."""
    runs = teacher_runs(spec)
    members = [_load(run, r, num_classes) for run, r in zip(runs, records)]
    gflops = (
        sum(count_flops(m, r.input_px) for m, r in zip(members, records)) / 1e9
        if cost
        else float("nan")
    )
    model = members[0] if len(members) == 1 else build_ensemble(members, runs, features=False)
    return CascadeTeacher(model, runs, records[0].input_px, gflops)


def teacher_files(spec: str) -> dict[str, str]:
    """The files that identify a cascade teacher's outputs (a prediction's fingerprint), by name
    (``teacher``, ``teacher_1``, ...): each member's model file; a foreign model's file (a
    SavedModel's ``saved_model.pb``) and its ``teacher.json`` (``<name>_json``)."""
    out = {}
    for i, run in enumerate(teacher_runs(spec)):
        key = f"teacher_{i}" if i else "teacher"
        if foreign.is_foreign(run):
            out[key] = os.path.join(run, "saved_model.pb") if os.path.isdir(run) else run
            out[f"{key}_json"] = foreign.teacher_json(run)
        else:
            out[key] = read_run_record(run).model_path(run)
    return out


def load_teacher(spec: str, student: RunRecord):
    """(teacher net, its first member's record) for kd-histo-predict's ``--cascade_teacher``,
    checked to fit ``student``; several runs are one ensemble; None without one (``spec`` "")."""
    if not spec:
        return None
    records = check_teacher_runs(spec, student)
    return load_cascade_teacher(spec, records, student.num_classes, cost=False).model, records[0]
