"""Run kinds are described once (``plan.KINDS``): a kind added to that table alone reaches the
plan, the result rows, the tables, the paired comparisons, report.md and the figures."""

import csv
import dataclasses
import json
import os

import numpy as np
import pytest

from kd_histo.data.pipeline import PipelineConfig
from kd_histo.evaluation.evaluate import METRICS_JSON, PREDICTIONS_CSV
from kd_histo.protocol import figures, report
from kd_histo.protocol import plan as plan_lib
from kd_histo.protocol.plan import ExperimentConfig, RunKind, eval_dir, plan, run_kind
from kd_histo.training.config import NetConfig, RunConfig

# The example of BUILD_NOTES.md, "Adding a run kind": a label-free student with feature hints only.
HINTS = RunKind("student_hint", mode="distill", view="lr", reads=("teacher",), unlabeled="none",
                label="student, hints only", epochs="student_epochs", marker="v",
                colour="tab:purple",
                note="Runs `student_hint_*`: the student without extra data.")  # fmt: skip


def _cfg(data_dir, out_dir) -> ExperimentConfig:
    base = RunConfig(mode="teacher", model_dir="unused",
                     data=PipelineConfig(data_dir, batch_size=4, shuffle_buffer=16),
                     net=NetConfig(planes=(4, 8, 8, 16)), epochs=1)  # fmt: skip
    return ExperimentConfig(out_dir=str(out_dir), base=base, factors=(2.0,),
                            unlabeled_fractions=(0.0, 1.0), n_boot=50)  # fmt: skip


def _write_evaluation(spec, labels, rng) -> None:
    """A run's predictions.csv and metrics.json as evaluation writes them (no training)."""
    skill = {"teacher": 0.9, "baseline": 0.6}.get(spec.kind, 0.75)
    pred = np.where(rng.random(len(labels)) < skill, labels, (labels + 1) % 4)
    out = eval_dir(spec, "test")
    os.makedirs(out)
    with open(os.path.join(out, PREDICTIONS_CSV), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source", "slide_id", "x", "y", "label", "pred", "pred_name"])
        w.writerows([f"t{i}.png", f"s{i // 2}", 0, 0, labels[i], pred[i], "c"] for i in range(40))
    acc = float(np.mean(pred == labels))
    cm = np.zeros((4, 4), int)
    np.add.at(cm, (labels, pred), 1)
    tile = {"n": 40, "accuracy": acc, "balanced_accuracy": acc, "macro_f1": acc, "macro_auc": acc,
            "ci95": {"accuracy": {"low": acc - 0.1, "high": acc + 0.1}},
            "confusion_matrix": cm.tolist()}  # fmt: skip
    with open(os.path.join(out, METRICS_JSON), "w") as f:
        json.dump({"tile": tile, "run": {"input_px": 32 if spec.factor == 1 else 16}}, f)


def test_a_kind_added_to_the_table_alone_reaches_plan_report_and_figures(
    tiny_shards, tmp_path, monkeypatch
):
    monkeypatch.setattr(plan_lib, "KINDS", (*plan_lib.KINDS, HINTS))
    cfg = _cfg(tiny_shards, tmp_path)
    specs = plan(cfg)
    # Training order: per factor the kinds without extra data first, then the pool's largest first.
    assert [s.name for s in specs] == [
        "teacher", "baseline_x2", "student_hint_x2", "student_x2_unl100", "student_x2"]  # fmt: skip
    hint = next(s for s in specs if s.kind == "student_hint").config
    assert hint.mode == "distill" and hint.distill.teacher == specs[0].model_dir
    assert hint.data.factor == 2.0 and hint.data.unlabeled_ratio == 0.0
    assert hint.distill.ce_weight == 0.0  # reads no labels

    labels = np.random.default_rng(0).integers(0, 4, 40)
    rng = np.random.default_rng(1)
    for spec in specs:
        _write_evaluation(spec, labels, rng)
    costs = {32: {"gflops": 0.4, "flops_ratio_to_ref": 1.0, "speedup": 1.0},
             16: {"gflops": 0.1, "flops_ratio_to_ref": 4.0, "speedup": 3.0}}  # fmt: skip
    paths = report.write_report(cfg, specs, {}, costs, wall_s=1.0)
    data = json.loads(open(paths["json"]).read())
    # Reading order: the table's order (the new kind last), each kind by growing fraction.
    assert [r["run"] for r in data["rows"]] == [
        "teacher", "baseline_x2", "student_x2", "student_x2_unl100", "student_hint_x2"]  # fmt: skip
    assert [p["student"] for p in data["paired"]] == [
        "student_x2", "student_x2_unl100", "student_hint_x2"]  # fmt: skip
    text = open(paths["report"]).read()
    assert (
        "| student_hint_x2 | 16 | 0.1000 |" in text
        and "| x2 | student_hint_x2 | baseline_x2 |" in text
    )
    assert "Runs `student_hint_*`: the student without extra data." in text
    # The figures draw it with its own label, marker and colour (series in the table's order).
    series = figures.gflops_series(data["rows"])
    assert [(k.name, extra) for k, extra, _ in series] == [
        ("teacher", False), ("baseline", False), ("student", False), ("student", True),
        ("student_hint", False)]  # fmt: skip
    kind, extra, sel = series[-1]
    assert kind is HINTS and figures.series_label(kind, extra) == "student, hints only"
    assert [r["run"] for r in sel] == ["student_hint_x2"]
    assert os.path.getsize(paths["accuracy_vs_gflops"]) > 0


def test_without_the_row_the_kind_is_unknown_everywhere(tiny_shards, tmp_path):
    assert "student_hint" not in [s.kind for s in plan(_cfg(tiny_shards, tmp_path))]
    with pytest.raises(ValueError, match="run kind 'student_hint' unknown"):
        run_kind("student_hint")


@pytest.mark.parametrize(
    "changes, message",
    [({"view": "hr"}, "teacher mode reads HR"),
     ({"reads": ("labels",)}, "distill runs, and only they, read a teacher"),
     ({"unlabeled": "some"}, "unlabeled 'some'")],
)  # fmt: skip
def test_a_kind_that_contradicts_itself_is_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(HINTS, **changes)
