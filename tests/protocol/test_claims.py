"""The paper's claims per factor, read off result rows (pure)."""

import pytest

from kd_histo.protocol.claims import claims_markdown, factor_claims


def _row(seed, run, kind, factor, fraction, acc):
    return {
        "seed": seed,
        "run": run,
        "kind": kind,
        "factor": factor,
        "unlabeled_fraction": fraction,
        "accuracy": acc,
    }


ROWS = [
    _row(0, "teacher", "teacher", 1.0, 0.0, 0.90),
    _row(1, "teacher", "teacher", 1.0, 0.0, 0.92),
    _row(0, "baseline_x8", "baseline", 8.0, 0.0, 0.84),
    _row(1, "baseline_x8", "baseline", 8.0, 0.0, 0.86),
    _row(0, "student_x8", "student", 8.0, 0.0, 0.85),
    _row(1, "student_x8", "student", 8.0, 0.0, 0.85),
    _row(0, "student_x8_unl50", "student", 8.0, 0.5, 0.88),
    _row(1, "student_x8_unl50", "student", 8.0, 0.5, 0.86),
    _row(0, "student_x8_unl100", "student", 8.0, 1.0, 0.89),
    _row(1, "student_x8_unl100", "student", 8.0, 1.0, 0.91),
    # uses labels: never the best *label-free* student, however accurate
    _row(0, "student_ce_x8_unl100", "student_ce", 8.0, 1.0, 0.99),
    # a factor with only one seed so far: the teacher is compared on that seed
    _row(1, "student_x2", "student", 2.0, 0.0, 0.93),
]
PAIRED = [
    {
        "student": "student_x8_unl100",
        "baseline": "baseline_x8",
        "difference": 0.05,
        "low": 0.01,
        "high": 0.09,
        "seeds": 2,
    }
]


def test_best_label_free_student_against_teacher_and_baseline():
    x2, x8 = factor_claims(ROWS, PAIRED)
    assert x8.factor == 8.0 and x8.best_student == "student_x8_unl100"
    assert x8.best_student_accuracy == pytest.approx(0.90) and x8.teacher == pytest.approx(0.91)
    assert x8.vs_teacher == pytest.approx(-0.01) and x8.baseline == pytest.approx(0.85)
    assert x8.vs_baseline is PAIRED[0]
    assert [f for f, _ in x8.by_fraction] == [0.0, 0.5, 1.0]
    assert [a for _, a in x8.by_fraction] == pytest.approx([0.85, 0.87, 0.90])
    assert x8.non_decreasing
    assert x2.best_student == "student_x2" and x2.teacher == pytest.approx(0.92)  # seed 1 only
    assert x2.vs_teacher == pytest.approx(0.01) and x2.baseline is None and x2.vs_baseline is None


def test_a_fall_with_more_unlabeled_data_is_reported():
    rows = [r if r["run"] != "student_x8_unl100" else dict(r, accuracy=0.80) for r in ROWS]
    (_, x8) = factor_claims(rows, [])
    assert x8.best_student == "student_x8_unl50" and not x8.non_decreasing
    table = claims_markdown([x8])
    assert "| x8 | 0.910 | 0.850 | student_x8_unl50 0.870 | -4.0 pts | - |" in table
    assert "0%: 0.850, 50%: 0.870, 100%: 0.800 | no |" in table


def test_table_prints_the_paired_interval():
    table = claims_markdown(factor_claims(ROWS, PAIRED))
    assert (
        "| x8 | 0.910 | 0.850 | student_x8_unl100 0.900 | -1.0 pts | +5.0 [+1.0, +9.0] pts (2 "
        "seeds) |" in table
    )


def test_no_teacher_no_claims():
    assert factor_claims([r for r in ROWS if r["kind"] != "teacher"], PAIRED) == []
