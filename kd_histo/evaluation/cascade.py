"""The cascade: a cheap low-resolution student scores every tile, the teacher re-scores the least
confident ones at high resolution.

The pure parts are here and tested against hand counts: a tile's confidence (its top class
probability), which tiles go to the teacher (:func:`select`: exactly ``floor(F * N)`` tiles for a
fraction F, the least confident first, ties by tile order; or every tile under a confidence
threshold), merging the two nets' probabilities (:func:`combine`), the cost per tile
(:func:`effective_gflops`: student + share x teacher) and the check that a teacher fits a
student (:func:`check_pair`: same class names in the same order, an HR teacher, the same HR tile
size and µm/px). :func:`measure_curve` runs a labeled split through the cascade at several
fractions and measures accuracy, effective GFLOPs per tile and tiles/s (the two nets on tiles held
in memory, so reading is not timed; the teacher alone is the reference of the speedup).

Not here: reading tiles or slides (``kd_histo.evaluation.evaluate``,
``kd_histo.evaluation.predict``), FLOPs counting
(``kd_histo.evaluation.cost``), files and figures (``kd_histo.evaluation.evaluate.write_cascade``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kd_histo.progress import Progress, progress
from kd_histo.training.run_record import RunRecord, teacher_misfit

DEFAULT_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.5)
CSV_COLUMNS = (
    "scored_by",
    "fraction",
    "n_tiles",
    "n_teacher",
    "teacher_share",
    "accuracy",
    "gflops_per_tile",
    "seconds",
    "tiles_per_s",
    "speedup_vs_teacher",
)


def confidence(probs: np.ndarray) -> np.ndarray:
    """The student's confidence in each tile: its largest class probability, [N]."""
    probs = np.asarray(probs, float)
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise ValueError(f"probs must be [tiles, classes], got shape {probs.shape}")
    return probs.max(1)


def n_for_teacher(n_tiles: int, fraction: float) -> int:
    """How many of ``n_tiles`` the teacher re-scores at ``fraction``: ``floor(fraction * n)``, so
    the teacher never sees more than the fraction (a float's rounding error, e.g. 0.29 * 100, is
    not a tile)."""
    if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise ValueError(f"cascade fraction must lie in [0, 1], got {fraction}")
    return min(n_tiles, int(math.floor(fraction * n_tiles + 1e-9)))


def select(
    probs: np.ndarray, *, fraction: float | None = None, threshold: float | None = None
) -> np.ndarray:
    """Which tiles the teacher re-scores: a boolean mask [N].

    Args:
      probs: the student's class probabilities [N, C].
      fraction: re-score exactly ``n_for_teacher(N, fraction)`` tiles, the least confident first;
        among equally confident tiles the earlier one goes first.
      threshold: instead, re-score every tile whose confidence is below this probability.

    Raises:
      ValueError: both or neither of fraction/threshold given, or either out of range.
    """
    conf = confidence(probs)
    if (fraction is None) == (threshold is None):
        raise ValueError(
            "give the cascade a fraction of tiles or a confidence threshold, not both or neither"
        )
    mask = np.zeros(len(conf), bool)
    if threshold is not None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"cascade confidence threshold must lie in (0, 1], got {threshold}")
        mask[conf < threshold] = True
        return mask
    k = n_for_teacher(len(conf), fraction)
    mask[np.argsort(conf, kind="stable")[:k]] = True
    return mask


def combine(student_probs: np.ndarray, teacher_probs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The cascade's probabilities: the teacher's where ``mask``, else the student's.

    Args:
      student_probs: [N, C].
      teacher_probs: [mask.sum(), C], the teacher's outputs for the masked tiles in tile order.
      mask: [N] bool from :func:`select`.
    """
    out = np.array(student_probs, float, copy=True)
    mask = np.asarray(mask, bool)
    teacher_probs = np.asarray(teacher_probs, float).reshape(-1, out.shape[1])
    if len(teacher_probs) != int(mask.sum()):
        raise ValueError(
            f"{len(teacher_probs)} teacher outputs for {int(mask.sum())} selected tiles"
        )
    out[mask] = teacher_probs
    return out


def effective_gflops(student_gflops: float, teacher_gflops: float, teacher_share: float) -> float:
    """GFLOPs per tile of the cascade: every tile through the student, ``teacher_share`` of them
    through the teacher too."""
    if not 0.0 <= teacher_share <= 1.0:
        raise ValueError(f"teacher share must lie in [0, 1], got {teacher_share}")
    return student_gflops + teacher_share * teacher_gflops


def check_pair(student: RunRecord, teacher: RunRecord) -> None:
    """The teacher can re-score the student's tiles; else one line saying what differs.

    Raises:
      ValueError: the teacher does not read HR tiles, its classes differ in names or order, or
        its HR tiles are another size or µm/px (beyond ``run_record.MPP_REL_TOL``, when both are
        known): :func:`kd_histo.training.run_record.teacher_misfit`, as training checks its teacher.
    """
    misfit = teacher_misfit(teacher, student.class_names, student.hr_px, student.mpp)
    if misfit == "view":
        raise ValueError(
            f"the cascade teacher must read HR tiles (a teacher run), got a {teacher.mode} run "
            f"on the {teacher.view.upper()} view x{teacher.factor:g}"
        )
    if misfit == "classes":
        raise ValueError(
            f"cascade teacher classes {list(teacher.class_names)} differ from the student's "
            f"{list(student.class_names)} (names and order must match); use the student's own "
            "teacher"
        )
    if misfit == "hr_px":
        raise ValueError(
            f"cascade teacher reads {teacher.hr_px} px HR tiles, the student's are {student.hr_px} "
            "px; "
            "use a teacher trained on the same tiles"
        )
    if misfit == "mpp":
        raise ValueError(
            f"cascade teacher was trained at {teacher.mpp:g} µm/px, the student at "
            f"{student.mpp:g}; "
            "use a teacher trained on the same tiles"
        )


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Tile accuracy over labeled tiles (label >= 0)."""
    labels = np.asarray(labels)
    keep = labels >= 0
    if not keep.any():
        raise ValueError(
            "the split has no labeled tiles; the cascade curve needs a labeled split (val or test)"
        )
    return float((np.asarray(probs)[keep].argmax(1) == labels[keep]).mean())


def measure_curve(
    student_fn: Callable[[np.ndarray], np.ndarray],
    teacher_fn: Callable[[np.ndarray], np.ndarray],
    student_inputs: np.ndarray,
    teacher_inputs: np.ndarray,
    labels: np.ndarray,
    *,
    student_gflops: float,
    teacher_gflops: float,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    batch_size: int = 64,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """Accuracy, effective GFLOPs per tile and measured tiles/s of the cascade at each fraction.

    The student runs over every tile once (timed); for each fraction the teacher runs over the
    selected tiles only (timed), and its outputs replace the student's there. The teacher alone
    over every tile is the last row and the reference of the speedup. Each net is run once on one
    batch before timing, so tracing is not timed; each timed pass is the median of ``repeats``.

    Args:
      student_fn / teacher_fn: a batch of inputs -> class probabilities [B, C] (numpy).
      student_inputs: the student's input tiles, [N, ...] in tile order.
      teacher_inputs: the teacher's HR tiles, [N, ...] in the same order.
      labels: [N] int, -1 = unlabeled (selected like any tile, left out of the accuracy).
      student_gflops / teacher_gflops: per tile, from ``kd_histo.evaluation.cost.count_flops``.
      fractions: teacher shares to measure.
      batch_size: tiles per forward pass.
      repeats: timed passes per measurement (the median is kept; a shared machine is noisy).

    Returns:
      Rows with the keys of :data:`CSV_COLUMNS`.
    """
    n = len(student_inputs)
    if n == 0 or len(teacher_inputs) != n or len(labels) != n:
        raise ValueError(
            f"the cascade needs the same tiles for both nets, got {len(student_inputs)} student, "
            f"{len(teacher_inputs)} teacher inputs and {len(labels)} labels"
        )
    passes = max(1, repeats) * (2 * n + sum(n_for_teacher(n, f) for f in fractions))
    bar = progress(total=passes, desc="cascade", unit="tiles")
    student_probs, t_student = _timed(student_fn, student_inputs, batch_size, repeats, bar)
    teacher_all, t_teacher = _timed(teacher_fn, teacher_inputs, batch_size, repeats, bar)
    rows = []
    for f in fractions:
        mask = select(student_probs, fraction=f)
        teacher_part, t_part = _timed(teacher_fn, teacher_inputs[mask], batch_size, repeats, bar)
        seconds = t_student + t_part
        share = float(mask.mean())
        rows.append(
            _row(
                "cascade",
                f,
                n,
                int(mask.sum()),
                share,
                accuracy(combine(student_probs, teacher_part, mask), labels),
                effective_gflops(student_gflops, teacher_gflops, share),
                seconds,
                t_teacher,
            )
        )
    bar.close()
    rows.append(
        _row(
            "teacher",
            1.0,
            n,
            n,
            1.0,
            accuracy(teacher_all, labels),
            teacher_gflops,
            t_teacher,
            t_teacher,
        )
    )
    return rows


def cheapest_within(rows: Sequence[dict[str, Any]], points: float = 1.0) -> dict[str, Any] | None:
    """The cascade row with the smallest teacher share whose accuracy is within ``points``
    percentage points of the teacher alone's (rows of :func:`measure_curve`); None if none is."""
    teacher = next(r for r in rows if r["scored_by"] == "teacher")
    ok = [
        r
        for r in rows
        if r["scored_by"] == "cascade"
        and r["accuracy"] >= teacher["accuracy"] - points / 100 - 1e-12
    ]
    return min(ok, key=lambda r: r["teacher_share"], default=None)


def _row(by, fraction, n, k, share, acc, gflops, seconds, teacher_seconds) -> dict[str, Any]:
    return {
        "scored_by": by,
        "fraction": float(fraction),
        "n_tiles": n,
        "n_teacher": k,
        "teacher_share": share,
        "accuracy": acc,
        "gflops_per_tile": gflops,
        "seconds": seconds,
        "tiles_per_s": n / seconds,
        "speedup_vs_teacher": teacher_seconds / seconds,
    }


def _timed(
    fn: Callable[[np.ndarray], np.ndarray],
    inputs: np.ndarray,
    batch_size: int,
    repeats: int = 1,
    bar: Progress | None = None,
) -> tuple[np.ndarray, float]:
    """fn over ``inputs`` in batches: (probabilities [N, C], median seconds of ``repeats`` passes).
    One untimed batch first. ``bar`` counts the tiles (its cost: about 1 µs a batch)."""
    if len(inputs) == 0:
        return np.zeros((0, 0)), 0.0
    fn(
        inputs[:batch_size]
    )  # warm-up: tracing and first-call allocations are not the cascade's cost
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = []
        for i in range(0, len(inputs), batch_size):
            out.append(np.asarray(fn(inputs[i : i + batch_size])))
            if bar is not None:
                bar.update(len(out[-1]))
        out = np.concatenate(out)
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))
