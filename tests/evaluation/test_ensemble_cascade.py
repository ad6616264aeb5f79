"""An ensemble as the cascade's teacher (issue 28, Deliver 1): kd-histo-evaluate scores with the
members' mean probability, and the teacher's cost is the sum of its members'."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
from support import SYNTHETIC_NAMES, run_record

from kd_histo.evaluation import evaluate
from kd_histo.evaluation.cost import count_flops
from kd_histo.evaluation.teachers import check_teacher_runs, load_cascade_teacher
from kd_histo.models import build_model, load_model
from kd_histo.training.run_record import RunRecord, write_run_record

NAMES = SYNTHETIC_NAMES


def _record(data_dir, **changes) -> RunRecord:
    return run_record(**{"data_dir": data_dir, **changes})


def _run(root, name, data_dir, seed=0, planes=(4, 8, 8, 16), **changes) -> str:
    r = _record(data_dir, **changes)
    d = os.path.join(str(root), name)
    os.makedirs(d)
    keras.utils.set_random_seed(seed)
    net = build_model(
        "resnet_gn", 4, mean=r.mean, std=r.std, planes=planes, stem="small", name=name
    )
    net.save(os.path.join(d, "model.keras"))
    write_run_record(d, r)
    return d


TEACHER = dict(mode="teacher", view="hr", factor=1.0, input_px=32)


def test_evaluate_cascades_to_an_ensemble_costing_its_members_sum(tmp_path, tiny_shards):
    student = _run(tmp_path, "student", tiny_shards)
    a = _run(tmp_path, "a", tiny_shards, seed=1, **TEACHER)
    b = _run(tmp_path, "b", tiny_shards, seed=2, planes=(4, 8, 8, 8), **TEACHER)
    spec = f"{a},{b}"
    out = evaluate.evaluate_run(
        evaluate.EvalConfig(student, n_boot=10, cascade_teacher=spec, cascade_fractions=(0.0,))
    )
    rows = json.load(open(out["cascade_json"]))["rows"]
    members = [load_model(os.path.join(r, "model.keras")) for r in (a, b)]
    gflops = sum(count_flops(m, 32) for m in members) / 1e9
    assert rows[-1]["scored_by"] == "teacher"  # the teacher alone: its members' cost
    assert rows[-1]["gflops_per_tile"] == pytest.approx(gflops)
    assert gflops > count_flops(members[0], 32) / 1e9
    # scored with the members' mean probability
    records = check_teacher_runs(spec, _record(tiny_shards))
    teacher = load_cascade_teacher(spec, records, 4, cost=False)
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    probs = keras.ops.softmax(teacher.model(x)["logits"]).numpy()
    want = np.mean([keras.ops.softmax(m(x)["logits"]).numpy() for m in members], axis=0)
    np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-7)


def test_a_member_that_does_not_fit_is_named(tmp_path, tiny_shards):
    a = _run(tmp_path, "a", tiny_shards, **TEACHER)
    odd = _run(tmp_path, "odd", tiny_shards, **{**TEACHER, "mpp": 1.0})
    with pytest.raises(ValueError, match=f"^{odd}: cascade teacher was trained at 1 µm/px") as e:
        check_teacher_runs(f"{a},{odd}", _record(tiny_shards))
    assert "\n" not in str(e.value)
