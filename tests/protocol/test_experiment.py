"""The experiment runner: the protocol's plan, a tiny end-to-end run, resume, the result rows."""

import dataclasses
import json
import os

import pytest
from support import REPO

from kd_histo.data.pipeline import PipelineConfig
from kd_histo.protocol import report
from kd_histo.protocol.experiment import run_experiment
from kd_histo.protocol.plan import ExperimentConfig, plan, run_name, run_names
from kd_histo.protocol.rows import result_rows, seed_summary
from kd_histo.protocol.tables import markdown_table
from kd_histo.training.config import DistillConfig, NetConfig, RunConfig


def _base(data_dir, **changes):
    data = PipelineConfig(data_dir, batch_size=4, shuffle_buffer=16)
    base = RunConfig(
        mode="teacher", model_dir="unused", data=data,
        net=NetConfig(planes=(4, 8, 8, 16), stem="small"),
        epochs=1, steps_per_epoch=2, profile_steps=(0, 0), image_grids=False, verbose=0,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


def _cfg(tiny_shards, out_dir, **changes):
    kw = dict(factors=(2.0,), unlabeled_fractions=(0.0, 1.0), n_boot=20, cost_batch_sizes=(1, 4),
              cost_repeats=1)  # fmt: skip
    kw.update(changes)
    return ExperimentConfig(out_dir=str(out_dir), base=_base(tiny_shards), **kw)


def test_run_names():
    assert run_name("teacher") == "teacher"
    assert run_name("baseline", 4.0) == "baseline_x4"
    assert run_name("student", 2.5) == "student_x2.5"
    assert run_name("student", 8.0, 0.25) == "student_x8_unl25"


def test_plan_follows_the_protocol(tiny_shards, tmp_path):
    cfg = _cfg(
        tiny_shards, tmp_path, factors=(2.0, 4.0), unlabeled_fractions=(0.0, 0.5, 1.0), seeds=(0, 3)
    )
    specs = plan(cfg)
    names = [s.name for s in specs if s.seed == 0]  # largest unlabeled pool first (cache reuse)
    assert names == [
        "teacher",
        "baseline_x2",
        "student_x2_unl100",
        "student_x2_unl50",
        "student_x2",
        "baseline_x4",
        "student_x4_unl100",
        "student_x4_unl50",
        "student_x4",
    ]
    assert len(specs) == 2 * len(names)
    by = {(s.seed, s.name): s for s in specs}
    teacher = by[3, "teacher"].config
    assert teacher.mode == "teacher" and teacher.seed == 3 and teacher.data.seed == 3
    assert teacher.model_dir == os.path.join(str(tmp_path), "runs", "s3", "teacher")
    base = by[0, "baseline_x4"].config
    assert base.mode == "baseline" and base.data.factor == 4.0 and base.data.unlabeled_ratio == 0.0
    student = by[3, "student_x2"].config
    assert student.mode == "distill" and student.distill.teacher == teacher.model_dir
    assert student.distill.ce_weight == 0.0 and student.data.unlabeled_ratio == 0.0
    # tiny_shards: 16 train tiles, an unlabeled split of 8: half the pool adds 4 tiles to 16
    half = by[0, "student_x2_unl50"].config.data
    assert half.unlabeled_fraction == 0.5 and half.unlabeled_ratio == pytest.approx(4 / 20)
    full = by[0, "student_x2_unl100"].config.data
    assert full.unlabeled_fraction == 1.0 and full.unlabeled_ratio == pytest.approx(8 / 24)


def test_plan_shares_one_teacher_cache_per_seed_and_factor(tiny_shards, tmp_path):
    cfg = _cfg(tiny_shards, tmp_path, factors=(2.0, 4.0), seeds=(0, 1))
    cfg = dataclasses.replace(
        cfg, base=dataclasses.replace(cfg.base, distill=DistillConfig(teacher_cache="auto"))
    )
    for s in plan(cfg):
        want = os.path.join(str(tmp_path), "runs", f"s{s.seed}", f"teacher_cache_x{s.factor:g}")
        assert s.config.distill.teacher_cache == (want if s.kind == "student" else ""), s.name
    with pytest.raises(ValueError, match="give teacher_cache 'auto' or ''"):
        dataclasses.replace(
            cfg, base=dataclasses.replace(cfg.base, distill=DistillConfig(teacher_cache="/x"))
        )


def test_teacher_may_train_longer_than_the_pair_it_is_compared_with(tiny_shards, tmp_path):
    specs = plan(_cfg(tiny_shards, tmp_path, teacher_epochs=5))
    assert {s.name: s.config.epochs for s in specs} == {
        "teacher": 5, "baseline_x2": 1, "student_x2_unl100": 1, "student_x2": 1}  # fmt: skip
    assert all(s.config.epochs == 1 for s in plan(_cfg(tiny_shards, tmp_path)))  # 0 = base epochs


def test_students_and_baselines_may_get_their_own_schedules(tiny_shards, tmp_path):
    specs = plan(_cfg(tiny_shards, tmp_path, student_epochs=7, baseline_epochs=3))
    assert {s.name: s.config.epochs for s in specs} == {
        "teacher": 1, "baseline_x2": 3, "student_x2_unl100": 7, "student_x2": 7}  # fmt: skip
    with pytest.raises(ValueError, match="student_epochs must be >= 0"):
        _cfg(tiny_shards, tmp_path, student_epochs=-1)


@pytest.mark.parametrize(
    "changes",
    [{}, {"baselines": False}, {"labeled_student_ce": 0.5, "factors": (2.0, 8.0)},
     {"unlabeled_fractions": (0.25, 0.0, 1.0), "seeds": (1, 2)}],
)  # fmt: skip
def test_run_names_are_the_plans_without_its_data(tiny_shards, tmp_path, changes):
    cfg = _cfg(tiny_shards, tmp_path, **changes)
    seed = cfg.seeds[0]
    assert run_names(cfg) == [s.name for s in plan(cfg) if s.seed == seed]
    gone = dataclasses.replace(cfg, base=_base(str(tmp_path / "no_such_shards")))
    assert run_names(gone) == run_names(cfg)  # names only: reads no dataset.json
    with pytest.raises(FileNotFoundError):
        plan(gone)


def test_plan_adds_a_student_that_also_learns_from_labels(tiny_shards, tmp_path):
    cfg = _cfg(
        tiny_shards,
        tmp_path,
        factors=(2.0, 4.0),
        unlabeled_fractions=(0.0, 0.5),
        labeled_student_ce=0.5,
    )
    cfg = dataclasses.replace(
        cfg, base=dataclasses.replace(cfg.base, distill=DistillConfig(teacher_cache="auto"))
    )
    by = {s.name: s for s in plan(cfg)}
    assert [n for n in by if n.startswith("student_ce")] == [
        "student_ce_x2_unl50",
        "student_ce_x4_unl50",
    ]
    ce, plain = by["student_ce_x4_unl50"], by["student_x4_unl50"]
    assert (
        ce.kind == "student_ce"
        and ce.config.mode == "distill"
        and ce.config.distill.ce_weight == 0.5
    )
    assert plain.config.distill.ce_weight == 0.0
    # the same data, teacher and teacher cache as the label-free student of that factor and pool
    assert ce.config.data == plain.config.data and ce.config.data.labeled
    assert ce.config.distill.teacher == plain.config.distill.teacher
    assert ce.config.distill.teacher_cache == plain.config.distill.teacher_cache
    assert not any(s.kind == "student_ce" for s in plan(_cfg(tiny_shards, tmp_path)))  # 0 = none
    with pytest.raises(ValueError, match="labeled_student_ce must be >= 0"):
        _cfg(tiny_shards, tmp_path, labeled_student_ce=-1.0)


def test_experiment_started_before_a_setting_existed_resumes(tiny_shards, tmp_path):
    from kd_histo.protocol import experiment

    cfg = _cfg(tiny_shards, tmp_path)
    old = cfg.to_dict()
    for key in ("student_epochs", "baseline_epochs", "labeled_student_ce"):
        del old[key]  # an experiment.json written before these settings were added
    (tmp_path / "experiment.json").write_text(json.dumps(old))
    experiment._check_same_experiment(cfg)  # their defaults are what it ran with
    with pytest.raises(ValueError, match=r"other settings \(student_epochs\)"):
        experiment._check_same_experiment(dataclasses.replace(cfg, student_epochs=30))


def test_experiment_started_before_a_run_setting_existed_resumes(tiny_shards, tmp_path):
    """A field added to a nested run config (the base's distill or stain settings) is absent
    from an older experiment.json and the committed bundles': it had its default then."""
    from kd_histo.protocol import experiment

    cfg = _cfg(tiny_shards, tmp_path)
    old = json.loads(json.dumps(cfg.to_dict()))
    del old["base"]["distill"]["ensemble_features"]
    (tmp_path / "experiment.json").write_text(json.dumps(old))
    experiment._check_same_experiment(cfg)
    other = dataclasses.replace(
        cfg,
        base=dataclasses.replace(
            cfg.base, distill=dataclasses.replace(cfg.base.distill, ensemble_features="off")
        ),
    )
    with pytest.raises(ValueError, match=r"other settings \(base.distill\)"):
        experiment._check_same_experiment(other)


def test_plan_without_baselines(tiny_shards, tmp_path):
    names = [
        s.name
        for s in plan(_cfg(tiny_shards, tmp_path, baselines=False, unlabeled_fractions=(0.0,)))
    ]
    assert names == ["teacher", "student_x2"]


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"factors": (1.0,)}, "factors must be > 1"),
        ({"unlabeled_fractions": (1.5,)}, r"unlabeled_fractions must lie in \[0, 1\]"),
        ({"seeds": ()}, "seeds is empty"),
        ({"eval_split": "train"}, "eval_split must be"),
        ({"out_dir": ""}, "out_dir is empty"),
    ],
)
def test_bad_experiment_config_is_a_clear_error(tiny_shards, tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        _cfg(tiny_shards, changes.pop("out_dir", tmp_path), **changes)


def test_unlabeled_fraction_without_unlabeled_data_is_a_clear_error(tiny_shards_without, tmp_path):
    with pytest.raises(ValueError, match="need unlabeled data"):
        plan(_cfg(tiny_shards_without("unlabeled"), tmp_path / "exp"))


@pytest.fixture(scope="module")
def finished(tiny_shards, tmp_path_factory):
    """A tiny experiment run to the end: teacher, baseline_x2, student_x2, student_x2_unl100."""
    cfg = _cfg(tiny_shards, tmp_path_factory.mktemp("experiment"))
    lines = []
    paths = run_experiment(cfg, log=lines.append)
    return cfg, paths, lines


def test_experiment_writes_results_and_report(finished):
    cfg, paths, lines = finished
    rows = json.loads(open(paths["json"]).read())["rows"]
    assert [r["run"] for r in rows] == ["teacher", "baseline_x2", "student_x2", "student_x2_unl100"]
    teacher = rows[0]
    for r in rows:
        assert 0.0 <= r["accuracy_low"] <= r["accuracy"] <= r["accuracy_high"] <= 1.0
        assert r["gap_to_teacher"] == pytest.approx(r["accuracy"] - teacher["accuracy"])
        assert r["train_s"] > 0 and r["n_eval"] == 8
    assert teacher["input_px"] == 32 and all(r["input_px"] == 16 for r in rows[1:])
    # The FLOPs ratio comes from the graphs: x2 is close to 4 (the pooled head adds a little).
    assert 3.5 < rows[1]["flops_ratio"] <= 4.0 and teacher["flops_ratio"] == 1.0
    assert teacher["speedup"] == 1.0 and rows[1]["speedup"] > 0
    for key in (
        "report",
        "csv",
        "md",
        "accuracy_vs_gflops",
        "accuracy_vs_unlabeled",
        "confusion_matrices",
    ):
        assert os.path.getsize(paths[key]) > 0, key
    text = open(paths["report"]).read()
    assert "| student_x2_unl100 | 16 |" in text and "accuracy_vs_gflops.png" in text
    out = os.path.join(cfg.out_dir, "report")
    assert sorted(os.listdir(os.path.join(out, "metrics"))) == sorted(
        f"s0_{r['run']}.json" for r in rows
    )
    assert os.path.isdir(os.path.join(out, "tensorboard", "s0", "student_x2", "train"))
    assert sum("training" in line for line in lines) == 4


def test_experiment_report_has_cascade_rows(finished):
    """The student without extra data gets the cascade with its teacher; the report shows it."""
    import csv

    cfg, paths, lines = finished
    rows = list(csv.DictReader(open(paths["cascade_csv"])))
    assert [r["run"] for r in rows] == ["student_x2"] * 5
    # 8 test tiles: floor(F * 8) of them go to the teacher at F = 0, 0.05, 0.1, 0.2, 0.5
    assert [int(r["n_teacher"]) for r in rows] == [0, 0, 0, 1, 4]
    results = {r["run"]: r for r in json.loads(open(paths["json"]).read())["rows"]}
    # F = 0 is the student alone, and the gap is to the teacher alone on the same tiles
    assert float(rows[0]["accuracy"]) == pytest.approx(results["student_x2"]["accuracy"])
    assert float(rows[0]["gap_to_teacher"]) == pytest.approx(
        results["student_x2"]["gap_to_teacher"]
    )
    text = open(paths["report"]).read()
    assert "Cascade: each student" in text and "| student_x2 | 50.0% |" in text
    state = json.load(open(os.path.join(cfg.out_dir, "state.json")))
    assert [k for k, v in state.items() if "cascade_s" in v] == ["s0/student_x2"]
    assert sum("cascade with the teacher measured" in line for line in lines) == 1


def test_rerun_skips_finished_runs(finished):
    cfg, _, _ = finished
    model = os.path.join(cfg.out_dir, "runs", "s0", "teacher", "model.keras")
    before = os.path.getmtime(model)
    lines = []
    run_experiment(cfg, log=lines.append)
    assert sum("trained already, skipped" in line for line in lines) == 4
    assert not any(line.endswith("epochs)") for line in lines)  # no "training (...)" line
    assert os.path.getmtime(model) == before


def test_rerun_with_other_settings_is_refused(finished):
    cfg, _, _ = finished
    other = dataclasses.replace(cfg, base=dataclasses.replace(cfg.base, epochs=3))
    with pytest.raises(ValueError, match=r"other settings \(base.epochs\)"):
        run_experiment(other, log=lambda _: None)


def test_result_rows_join_metrics_cost_and_time():
    @dataclasses.dataclass
    class Spec:
        name: str
        kind: str
        factor: float
        unlabeled_fraction: float
        seed: int

    def metrics(acc, px):
        ci = {"accuracy": {"low": acc - 0.1, "high": acc + 0.1}}
        return {
            "tile": {
                "n": 10,
                "accuracy": acc,
                "balanced_accuracy": acc,
                "macro_f1": acc,
                "macro_auc": 0.9,
                "ci95": ci,
            },
            "run": {"input_px": px},
        }

    specs = [Spec("teacher", "teacher", 1.0, 0.0, 0), Spec("student_x2", "student", 2.0, 0.0, 0),
             Spec("teacher", "teacher", 1.0, 0.0, 1), Spec("student_x2", "student", 2.0, 0.0, 1),
             Spec("baseline_x2", "baseline", 2.0, 0.0, 1)]  # fmt: skip
    m = {
        "s0/teacher": metrics(0.9, 64),
        "s0/student_x2": metrics(0.8, 32),
        "s1/teacher": metrics(0.7, 64),
        "s1/student_x2": metrics(0.75, 32),
    }  # fmt: skip  (s1/baseline_x2 not evaluated yet)
    costs = {64: {"gflops": 2.0, "flops_ratio_to_ref": 1.0, "speedup": 1.0},
             32: {"gflops": 0.5, "flops_ratio_to_ref": 4.0, "speedup": 3.2}}  # fmt: skip
    rows = result_rows(specs, m, {"s1/student_x2": {"train_s": 12.5}}, costs)
    assert [(r["seed"], r["run"]) for r in rows] == [
        (0, "teacher"),
        (0, "student_x2"),
        (1, "teacher"),
        (1, "student_x2"),
    ]
    assert rows[1]["gap_to_teacher"] == pytest.approx(-0.1) and rows[3][
        "gap_to_teacher"
    ] == pytest.approx(0.05)
    assert (
        rows[3]["flops_ratio"] == 4.0 and rows[3]["speedup"] == 3.2 and rows[3]["train_s"] == 12.5
    )
    assert rows[1]["train_s"] is None
    table = markdown_table(rows)
    assert (
        "| student_x2 | 32 | 0.5000 | 4.0 | 3.2x | 0.750 [0.650, 0.850] | 0.750 | +5.0 pts | 1 |"
        in table
    )
    summary = {s["run"]: s for s in seed_summary(rows)}
    assert summary["student_x2"]["accuracy_mean"] == pytest.approx(0.775)
    assert summary["student_x2"]["accuracy_sd"] == pytest.approx(0.0353553, rel=1e-4)
    # Before the cost is measured, the cost columns are empty, not wrong.
    assert result_rows(specs, m, {}, None)[1]["gflops"] is None


def test_report_has_the_paired_difference_to_the_baseline(finished):
    _, paths, _ = finished
    data = json.loads(open(paths["json"]).read())
    by_run = {r["run"]: r for r in data["rows"]}
    assert [p["student"] for p in data["paired"]] == ["student_x2", "student_x2_unl100"]
    for p in data["paired"]:  # one seed: the paired mean is the difference of the accuracies
        diff = by_run[p["student"]]["accuracy"] - by_run["baseline_x2"]["accuracy"]
        assert p["difference"] == pytest.approx(diff) and p["seeds"] == 1 and p["n_tiles"] == 8
        assert p["low"] <= p["difference"] <= p["high"]
    assert "Student − baseline of the same factor" in open(paths["report"]).read()


def test_rerun_on_a_reconverted_data_set_is_refused(finished, tmp_path):
    from kd_histo.protocol import experiment

    cfg, _, _ = finished
    assert os.path.isfile(os.path.join(cfg.out_dir, "dataset.json"))  # kept when it started
    # The same experiment in another folder, started on the data set before it was re-converted
    # (the shared tiny data set itself stays read-only).
    other = dataclasses.replace(cfg, out_dir=str(tmp_path))
    (tmp_path / "experiment.json").write_text(json.dumps(other.to_dict()))
    info = json.loads(open(os.path.join(cfg.base.data.data_dir, "dataset.json")).read())
    info["notes"].append("group_by=phash: ...")  # converted with other groups since
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="changed since the experiment"):
        experiment._check_same_experiment(other)
    info["notes"].pop()
    info["command"] = "kd-histo-convert ... --overwrite"  # the command line alone does not count
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    experiment._check_same_experiment(other)


def test_multi_seed_report_from_run_folders(tiny_shards, tmp_path):
    """write_report over two seeds' evaluations (written here, no training): mean ± sd, the
    paired table over both seeds, and the figures."""
    import csv

    import numpy as np

    from kd_histo.evaluation.evaluate import METRICS_JSON, PREDICTIONS_CSV
    from kd_histo.protocol.plan import eval_dir

    cfg = ExperimentConfig(out_dir=str(tmp_path), base=_base(tiny_shards), factors=(2.0,),
                           unlabeled_fractions=(0.0, 1.0), seeds=(0, 1), n_boot=200,
                           labeled_student_ce=1.0)  # fmt: skip
    specs = plan(cfg)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 40)
    for spec in specs:
        skill = {"teacher": 0.9, "baseline": 0.6, "student": 0.75, "student_ce": 0.8}[
            spec.kind
        ] + 0.05 * spec.seed
        pred = np.where(rng.random(40) < skill, labels, (labels + 1) % 4)
        out = eval_dir(spec, "test")
        os.makedirs(out)
        with open(os.path.join(out, PREDICTIONS_CSV), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["source", "slide_id", "x", "y", "label", "pred", "pred_name"])
            w.writerows(
                [f"t{i}.png", f"s{i // 2}", 0, 0, labels[i], pred[i], "c"] for i in range(40)
            )
        acc = float(np.mean(pred == labels))
        cm = np.zeros((4, 4), int)
        np.add.at(cm, (labels, pred), 1)
        tile = {
            "n": 40,
            "accuracy": acc,
            "balanced_accuracy": acc,
            "macro_f1": acc,
            "macro_auc": acc,
            "ci95": {"accuracy": {"low": acc - 0.1, "high": acc + 0.1}},
            "confusion_matrix": cm.tolist(),
        }
        with open(os.path.join(out, METRICS_JSON), "w") as f:
            json.dump({"tile": tile, "run": {"input_px": 32 if spec.kind == "teacher" else 16}}, f)
    costs = {32: {"gflops": 0.4, "flops_ratio_to_ref": 1.0, "speedup": 1.0},
             16: {"gflops": 0.1, "flops_ratio_to_ref": 4.0, "speedup": 3.0}}  # fmt: skip
    paths = report.write_report(cfg, specs, {}, costs, wall_s=1.0)
    data = json.loads(open(paths["json"]).read())
    summary = {s["run"]: s for s in data["summary"]}
    accs = [r["accuracy"] for r in data["rows"] if r["run"] == "student_x2"]
    assert summary["student_x2"]["seeds"] == 2
    assert summary["student_x2"]["accuracy_mean"] == pytest.approx(np.mean(accs))
    assert summary["student_x2"]["accuracy_sd"] == pytest.approx(np.std(accs, ddof=1))
    assert [(p["student"], p["seeds"], p["n_tiles"]) for p in data["paired"]] == [
        ("student_x2", 2, 40),
        ("student_x2_unl100", 2, 40),
        ("student_ce_x2_unl100", 2, 40),
    ]
    base = [r["accuracy"] for r in data["rows"] if r["run"] == "baseline_x2"]
    assert data["paired"][0]["difference"] == pytest.approx(np.mean(accs) - np.mean(base))
    text = open(paths["report"]).read()
    assert "| x2 | student_x2 | baseline_x2 | 2 | 40 |" in text
    # One row per model over the seeds: mean ± sd, each seed, the paired difference (students only).
    d = data["paired"][0]
    row = (
        f"| student_x2 | 16 | 0.1000 | 3.0x | {np.mean(accs):.3f} ± {np.std(accs, ddof=1):.3f} | "
        f"{accs[0]:.3f} / {accs[1]:.3f} | {100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, "
        f"{100 * d['high']:+.1f}] pts |"
    )
    with open(paths["md"]) as f:
        assert row in text and row in f.read()
    assert (
        f"| baseline_x2 | 16 | 0.1000 | 3.0x | {np.mean(base):.3f} ± {np.std(base, ddof=1):.3f} | "
        in text
    )
    assert (
        text.index(row)
        < text.index("Every run of every seed:")
        < text.index("| model | input px | GFLOPs/image | FLOPs ÷")
    )
    assert "dots = single seeds" in text
    # The paper's claims: the best label-free student (not student_ce) against teacher and baseline.
    best = max(("student_x2", "student_x2_unl100"), key=lambda n: summary[n]["accuracy_mean"])
    best_paired = next(p for p in data["paired"] if p["student"] == best)
    claim = (
        f"| x2 | {summary['teacher']['accuracy_mean']:.3f} | "
        f"{summary['baseline_x2']['accuracy_mean']:.3f} | "
        f"{best} {summary[best]['accuracy_mean']:.3f} | "
        f"{100 * (summary[best]['accuracy_mean'] - summary['teacher']['accuracy_mean']):+.1f} pts "
        "| "
        f"{100 * best_paired['difference']:+.1f} ["
    )
    assert claim in text and claim in open(paths["md"]).read()
    assert "Runs `student_ce_*`: the same student that also learns from the labels" in text
    assert [r["run"] for r in data["rows"] if r["seed"] == 0][-1] == "student_ce_x2_unl100"
    for key in ("accuracy_vs_gflops", "accuracy_vs_unlabeled", "confusion_matrices"):
        assert os.path.getsize(paths[key]) > 0


def test_an_ablation_borrows_the_main_runs_teachers(finished, tmp_path):
    from kd_histo.protocol import experiment

    cfg, _, _ = finished
    ablation = dataclasses.replace(
        cfg, out_dir=str(tmp_path / "ablation"), teachers_from=cfg.out_dir, student_epochs=2
    )
    specs = plan(ablation)
    teacher = os.path.join(cfg.out_dir, "runs", "s0", "teacher")
    assert next(s for s in specs if s.kind == "teacher").model_dir == teacher
    assert {s.config.distill.teacher for s in specs if s.kind == "student"} == {teacher}
    assert all(
        s.model_dir.startswith(str(tmp_path / "ablation")) for s in specs if s.kind != "teacher"
    )
    experiment._check_borrowed_teachers(ablation, specs)  # trained there, with these settings
    other = dataclasses.replace(ablation, teacher_epochs=3)
    with pytest.raises(ValueError, match=r"trained with other settings \(epochs\)"):
        experiment._check_borrowed_teachers(other, plan(other))
    more = dataclasses.replace(ablation, seeds=(0, 1))
    with pytest.raises(ValueError, match="holds no trained teacher for seed 1"):
        run_experiment(more, log=lambda _: None)
    assert not os.path.exists(os.path.join(cfg.out_dir, "runs", "s1"))  # nothing written there


def test_complete_seeds_move_through_a_results_folder(finished, tmp_path):
    """A fresh checkout: seed 0 comes from the committed results folder (no weights; not
    retrained), seed 1 trains here, and the report pairs both seeds."""
    import csv

    from kd_histo.protocol import bundle

    cfg, paths, _ = finished
    results = tmp_path / "results"
    assert bundle.export_seeds(cfg, plan(cfg), str(results)) == [0]
    files = [p for p in results.rglob("*") if p.is_file()]
    assert not any(
        p.suffix in (".keras", ".pb", ".f32", ".float16") for p in files
    )  # no weights, no caches
    assert {p.name for p in files} >= {
        "tile_predictions.csv",
        "metrics.json",
        "run.json",
        "cascade.json",
    }

    fresh = dataclasses.replace(
        cfg, out_dir=str(tmp_path / "fresh"), seeds=(0, 1), results_dir=str(results)
    )
    lines = []
    new = run_experiment(fresh, log=lines.append)
    assert "seed 0: 4 finished runs imported" in "\n".join(lines)
    assert sum("training" in line for line in lines) == 4  # seed 1's four runs only
    data = json.loads(open(new["json"]).read())
    before = json.loads(open(paths["json"]).read())["rows"]
    assert [(r["run"], r["accuracy"]) for r in data["rows"] if r["seed"] == 0] == [
        (r["run"], r["accuracy"]) for r in before]  # fmt: skip
    assert {p["seeds"] for p in data["paired"]} == {2}
    assert all(r["gflops"] for r in data["rows"])  # measured on seed 1's nets

    def tiles(folder):
        with open(
            os.path.join(folder, "runs", "s0", "student_x2", "eval_test", "predictions.csv")
        ) as f:
            return sorted(
                (r["source"], r["x"], r["y"], r["label"], r["pred"]) for r in csv.DictReader(f)
            )

    assert tiles(cfg.out_dir) == tiles(fresh.out_dir)  # the per-tile predictions came back whole
    header = (results / "bundle" / "tile_predictions.csv").read_text().splitlines()[0].split(",")
    assert {"s0/student_x2", "s1/student_x2"} <= set(header)  # seed 1 exported once it was complete
    assert (results / "results.md").read_text() == open(new["md"]).read()
    assert (results / "report.md").is_file()
    # An ablation cannot borrow an imported teacher (no weights) for a seed it still has to train.
    ablation = dataclasses.replace(
        cfg, out_dir=str(tmp_path / "abl"), teachers_from=fresh.out_dir, student_epochs=2
    )
    with pytest.raises(ValueError, match="has its record but not its weights"):
        run_experiment(ablation, log=lambda _: None)


def test_a_seed_imported_whole_still_gets_its_cost_columns(finished, tmp_path):
    """Every run of the seed comes from the results folder (no weights): FLOPs and parameters are
    measured on each run's architecture built untrained, so the tables match the committed ones."""
    from kd_histo.protocol import bundle

    cfg, paths, _ = finished
    results = tmp_path / "results"
    bundle.export_seeds(cfg, plan(cfg), str(results))
    fresh = dataclasses.replace(cfg, out_dir=str(tmp_path / "fresh"), results_dir=str(results))
    lines = []
    new = run_experiment(fresh, log=lines.append)
    assert not any("training" in line for line in lines)
    assert not any("not measured" in line for line in lines)
    rows = json.loads(open(new["json"]).read())["rows"]
    before = json.loads(open(paths["json"]).read())["rows"]
    assert [(r["run"], r["accuracy"], r["gflops"], r["flops_ratio"]) for r in rows] == [
        (r["run"], r["accuracy"], r["gflops"], r["flops_ratio"]) for r in before]  # fmt: skip
    assert all(r["gflops"] and r["speedup"] for r in rows)


def test_a_results_folder_compares_as_its_experiment_folder_does(finished, tmp_path):
    """tools/compare_runs.py reads committed seeds from a results folder's bundle: every pair gives
    what the experiment folder gives (accuracy, per-seed difference, CI, wall time), so a fresh
    checkout reruns a comparison without retraining or importing."""
    from kd_histo.protocol import bundle
    from kd_histo.protocol.compare import RunRef, compare

    cfg, _, _ = finished
    results = str(tmp_path / "results")
    bundle.export_seeds(cfg, plan(cfg), results)
    runs = ("teacher", "baseline_x2", "student_x2_unl100")
    for a in runs:
        for b in runs:
            from_runs = compare(RunRef(cfg.out_dir, a), RunRef(cfg.out_dir, b), n_boot=50)
            for folder in (results, os.path.join(results, "bundle")):
                from_bundle = compare(RunRef(folder, a), RunRef(cfg.out_dir, b), n_boot=50)
                assert dataclasses.replace(from_bundle, a=from_runs.a) == from_runs, (a, b)
    with pytest.raises(ValueError, match="holds evaluations on 'test' only, not 'val'"):
        compare(RunRef(results, "teacher"), RunRef(cfg.out_dir, "teacher"), split="val")
    with pytest.raises(FileNotFoundError, match="no seed of this run was evaluated on test"):
        compare(RunRef(results, "student_x4"), RunRef(cfg.out_dir, "teacher"))


def test_a_results_folder_of_another_experiment_is_refused(finished, tmp_path):
    from kd_histo.protocol import bundle

    cfg, _, _ = finished
    bundle.export_seeds(cfg, plan(cfg), str(tmp_path / "results"))
    other = dataclasses.replace(
        cfg,
        out_dir=str(tmp_path / "other"),
        results_dir=str(tmp_path / "results"),
        base=dataclasses.replace(cfg.base, epochs=2),
    )
    with pytest.raises(
        ValueError,
        match=r"bundle holds an experiment with other settings \(base.epochs\).*--results_dir",
    ):
        run_experiment(other, log=lambda line: None)
    assert not (tmp_path / "other").exists()


def test_the_bundle_layout_is_not_git_ignored(finished, tmp_path):
    """Every file export writes must reach a commit: an unanchored ``runs/`` in .gitignore once
    dropped the bundle's run records and left a table no fresh checkout could import."""
    import shutil
    import subprocess

    from kd_histo.protocol import bundle

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the repository's git checkout")
    cfg, _, _ = finished
    results = tmp_path / "results"
    bundle.export_seeds(cfg, plan(cfg), str(results))
    names = sorted(os.path.join("results", "lc25000_3seeds", str(p.relative_to(results)))
                   for p in results.rglob("*") if p.is_file())  # fmt: skip
    assert any("/runs/" in n for n in names) and len(names) > 10
    check = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin"],
        cwd=REPO,
        input="\n".join(names),
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 1, (
        f"ignored by .gitignore: {check.stdout}"
    )  # 1: none of them is ignored


def test_a_bundle_without_its_run_records_is_refused(finished, tmp_path):
    import shutil

    from kd_histo.protocol import bundle

    cfg, _, _ = finished
    results = tmp_path / "results"
    bundle.export_seeds(cfg, plan(cfg), str(results))
    shutil.rmtree(results / "bundle" / "runs" / "s0" / "student_x2")
    fresh = dataclasses.replace(cfg, out_dir=str(tmp_path / "fresh"), results_dir=str(results))
    with pytest.raises(
        ValueError, match=r"holds run s0/student_x2 but .*run.json is missing.*git status --ignored"
    ):
        run_experiment(fresh, log=lambda _: None)
    assert not (tmp_path / "fresh" / "runs").exists()  # nothing half-imported


def test_the_runner_builds_each_seeds_teacher_caches_before_its_first_student(
    tiny_shards, tmp_path
):
    """The x2 and x4 students' caches come from one teacher pass per seed, run by the runner
    before the seed's first student (its time goes to the teacher's state entry, not to that
    student's training time); the x4 student then builds nothing."""
    base = _base(tiny_shards, data=PipelineConfig(tiny_shards, batch_size=4, augment="flips"),
                 distill=DistillConfig(teacher_cache="auto"))  # fmt: skip
    cfg = ExperimentConfig(
        out_dir=str(tmp_path),
        base=base,
        factors=(2.0, 4.0),
        unlabeled_fractions=(1.0,),
        baselines=False,
        cascade_fractions=(),
        n_boot=20,
        cost_batch_sizes=(1,),
        cost_repeats=1,
    )
    lines = []
    run_experiment(cfg, log=lines.append)
    builds = [line for line in lines if "teacher cache: running the teacher" in line]
    assert len(builds) == 2 and "8x" in builds[0] and "1x" in builds[1]  # training, then validation
    assert all("teacher_cache_x2" in line and "teacher_cache_x4" in line for line in builds)
    first = next(i for i, line in enumerate(lines) if "s0/student_x2_unl100: training" in line)
    assert (
        first
        < lines.index(builds[0])
        < lines.index(builds[1])
        < next(i for i, line in enumerate(lines) if "s0/student_x2_unl100: test accuracy" in line)
    )
    with open(os.path.join(cfg.out_dir, "state.json")) as f:
        state = json.load(f)
    assert (
        state["s0/teacher"]["teacher_cache_s"] > 0 and state["s0/student_x4_unl100"]["train_s"] > 0
    )


_STALLED_EVALUATION = """
import sys, time
from kd_histo.evaluation import evaluate, plots

def stall(*args, **kwargs):  # the ROC figure is the last file before the marker: hang there
    open(sys.argv[3], "w").close()
    time.sleep(300)

plots.roc_png = stall
evaluate.evaluate_run(evaluate.EvalConfig(sys.argv[1], "test", out_dir=sys.argv[2], n_boot=20))
"""


def test_an_evaluation_killed_mid_way_is_evaluated_again(finished, tmp_path):
    """SIGKILL kd_histo's evaluation of a run after its first files are written: no metrics.json
    is left to say the evaluation is done, and the runner evaluates that run again."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    cfg, _, _ = finished
    copy = dataclasses.replace(cfg, out_dir=str(tmp_path / "exp"))
    shutil.copytree(cfg.out_dir, copy.out_dir)
    spec = next(s for s in plan(copy) if s.name == "baseline_x2")
    out = os.path.join(spec.model_dir, f"eval_{copy.eval_split}")
    with open(os.path.join(out, "metrics.json")) as f:
        before = json.load(f)
    stalled = tmp_path / "stalled"
    proc = subprocess.Popen(
        [sys.executable, "-c", _STALLED_EVALUATION, spec.model_dir, out, str(stalled)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    try:
        deadline = time.time() + 300
        while not stalled.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert stalled.exists(), f"the evaluation never reached its last figure ({proc.poll()})"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert os.path.isfile(os.path.join(out, "predictions.csv"))  # killed after its first files
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    assert not [f for f in os.listdir(out) if ".tmp-" in f]
    lines = []
    run_experiment(copy, log=lines.append)
    with open(os.path.join(out, "metrics.json")) as f:
        after = json.load(f)
    # evaluated again: the same network on the same tiles
    assert [after["tile"][k] for k in ("n", "confusion_matrix")] == [
        before["tile"][k] for k in ("n", "confusion_matrix")
    ]
    with open(os.path.join(copy.out_dir, "state.json")) as f:
        state = json.load(f)
    with open(os.path.join(cfg.out_dir, "state.json")) as f:
        assert state["s0/baseline_x2"]["eval_s"] != json.load(f)["s0/baseline_x2"]["eval_s"]


def test_a_diverged_run_is_said_once_in_the_experiment_log(tmp_path, monkeypatch):
    """The training library returns the diverged epoch without a note of its own; the runner says
    it in its log (the binary kd-histo-train says it in its error line)."""
    from kd_histo.protocol import experiment
    from kd_histo.protocol.plan import RunSpec
    from kd_histo.training import train

    run = _base("unused", model_dir=str(tmp_path / "teacher"))
    spec = RunSpec("teacher", "teacher", 1.0, 0.0, 0, run)
    results = {
        "fine": train.TrainResult(run.model_dir, "model.keras", {}, 1, 0.5),
        "diverged": train.TrainResult(run.model_dir, "model.keras", {}, 3, 0.5, 1),
    }
    for outcome, result in results.items():
        monkeypatch.setattr(train, "train", lambda cfg, result=result: result)
        lines = []
        state = experiment._State(str(tmp_path))
        experiment._train([spec], spec, state, set(), "s0/teacher", lines.append)
        said = [line for line in lines if "diverged" in line]
        if outcome == "fine":
            assert not said, lines
        else:
            assert said == [
                "s0/teacher: the training diverged in epoch 1 (NaN/inf loss or val metrics); the "
                "best network before it is kept"
            ]
