"""Every flagfile in flags/ parses into a valid RunConfig with the paper's settings."""

import dataclasses

import pytest
from support import REPO

from kd_histo.cli import flags_common as fc
from kd_histo.protocol import plan as plan_lib

from .cli_helpers import BINARIES

ALL = sorted((REPO / "flags").rglob("*.flags"))
ABLATIONS = [
    p for p in ALL if p.name.startswith("ablation_")
]  # kd-histo-experiment, a main run's ablation
EXPERIMENTS = [p for p in ALL if p.name == "experiment.flags"]  # kd-histo-experiment
ENSEMBLES = [p for p in ALL if p.name == "ensemble.flags"]  # kd-histo-experiment, new rows only
TEACHERS = [p for p in ALL if p.name == "ensemble_teachers.flags"]  # kd-histo-experiment, teachers
COMPARISONS = [p for p in ALL if p.name.startswith("compare_")]  # tools/compare_runs.py
DRIVERS = [p for p in ALL if p.name == "domain_shift.flags"]  # tools/domain_shift.py
FLAGFILES = [
    p
    for p in ALL
    if p.name != "common.flags"
    and p not in EXPERIMENTS + ABLATIONS + ENSEMBLES + TEACHERS + COMPARISONS + DRIVERS
]  # kd-histo-train


def _config(flagfile):
    fc.FLAGS.unparse_flags()
    try:
        fc.FLAGS(["kd-histo-train", f"--flagfile={flagfile.relative_to(REPO)}"])
        return BINARIES["train"].config_from_flags()
    finally:
        fc.FLAGS.unparse_flags()


def test_the_issue_asks_for_these_flagfiles():
    names = {str(p.relative_to(REPO / "flags")) for p in FLAGFILES}
    want = {
        f"{d}/{n}.flags"
        for d in ("demo", "tiles")
        for n in (
            "teacher",
            "baseline_x2",
            "baseline_x4",
            "baseline_x8",
            "student_x2",
            "student_x4",
            "student_x8",
        )
    }
    assert want | {"tiles/student_x4_unlabeled.flags", "demo/student_x4_unlabeled.flags"} <= names


@pytest.mark.parametrize("flagfile", FLAGFILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_flagfile_resolves(flagfile, monkeypatch):
    monkeypatch.chdir(REPO)  # nested --flagfile paths are relative to the repository root
    cfg = _config(flagfile)
    assert (
        cfg.optim.name == "adam"
        and cfg.optim.learning_rate == 1e-3
        and cfg.optim.weight_decay == 1e-4
    )
    stem = flagfile.stem
    if stem == "teacher":
        assert cfg.mode == "teacher" and cfg.view == "hr"
    else:
        factor = float(stem.split("_x")[1].split("_")[0])
        assert cfg.data.factor == factor and cfg.model_dir.endswith(stem)
        if stem.startswith("student"):
            assert cfg.mode == "distill" and cfg.distill.teacher.endswith("teacher")
            assert cfg.distill.feature_mode == "maxpool+bicubic" and cfg.distill.ce_weight == 0
        else:
            assert cfg.mode == "baseline"
    if stem.endswith("unlabeled"):  # the demo's pool is its own 'unlabeled' split
        assert cfg.data.unlabeled_ratio > 0 and (cfg.data.unlabeled_dirs or "demo" in str(flagfile))


@pytest.mark.parametrize("flagfile", EXPERIMENTS, ids=lambda p: p.parent.name)
def test_experiment_flagfile_resolves(flagfile, monkeypatch, tmp_path):
    """An experiment flagfile gives the paper's protocol; its data folders need not exist yet."""
    from kd_histo.cli import experiment as experiment_cli

    monkeypatch.chdir(REPO)
    fc.FLAGS.unparse_flags()
    try:
        fc.FLAGS(["kd-histo-experiment", f"--flagfile={flagfile.relative_to(REPO)}"])
        assert not any(fc.FLAGS[n].present for n in experiment_cli.PER_RUN)
        assert fc.FLAGS.data_dir and fc.FLAGS.out_dir and fc.FLAGS.factors == ["2", "4", "8"]
        assert (
            fc.FLAGS.learning_rate == 1e-3
            and fc.FLAGS.weight_decay == 1e-4
            and fc.FLAGS.optimizer == "adam"
        )
        assert fc.FLAGS.feature_mode == "maxpool+bicubic" and fc.FLAGS.ce_weight == 0
        text = flagfile.read_text()
        assert (
            f"kd-histo-experiment --flagfile={flagfile.relative_to(REPO)}" in text
        )  # says how to run it
    finally:
        fc.FLAGS.unparse_flags()


def _experiment_config(path):
    from kd_histo.cli import experiment as experiment_cli

    fc.FLAGS.unparse_flags()
    try:
        fc.FLAGS(["kd-histo-experiment", f"--flagfile={path.relative_to(REPO)}"])
        return experiment_cli.config_from_flags()
    finally:
        fc.FLAGS.unparse_flags()


@pytest.mark.parametrize("flagfile", ABLATIONS, ids=lambda p: p.stem)
def test_ablation_flagfile_changes_one_schedule_and_trains_its_own_teachers(flagfile, monkeypatch):
    """An ablation is its experiment.flags with one schedule changed and the grid narrowed: either
    the students' and baselines' epochs (the teachers then keep the main run's settings and seeds:
    the same teachers, up to CPU rounding) or the teacher's epochs alone (baselines, which do not
    read the teacher, may then be left out and paired with the main run's). It trains its own
    teachers, so it resumes in any checkout: the main run's teachers are not committed."""
    import dataclasses

    monkeypatch.chdir(REPO)
    main, abl = (
        _experiment_config(flagfile.parent / "experiment.flags"),
        _experiment_config(flagfile),
    )
    assert abl.teachers_from == "" and abl.out_dir != main.out_dir
    assert abl.results_dir and abl.results_dir != main.results_dir
    assert (
        dataclasses.replace(abl.base, model_dir=main.base.model_dir) == main.base
        and abl.seeds == main.seeds
    )
    changed = {
        f.name for f in dataclasses.fields(abl) if getattr(abl, f.name) != getattr(main, f.name)
    }
    assert changed <= {
        "base",
        "out_dir",
        "results_dir",
        "title",
        "factors",
        "unlabeled_fractions",
        "labeled_student_ce",
        "cascade_fractions",
        "student_epochs",
        "baseline_epochs",
        "teacher_epochs",
        "baselines",
    }
    schedules = changed & {"teacher_epochs", "student_epochs", "baseline_epochs"}
    assert schedules == {"teacher_epochs"} or (schedules and "teacher_epochs" not in schedules), (
        schedules
    )
    assert "baselines" not in changed or schedules == {
        "teacher_epochs"
    }  # skipped only if unaffected
    assert set(abl.factors) <= set(main.factors) and set(abl.unlabeled_fractions) <= set(
        main.unlabeled_fractions
    )
    assert f"kd-histo-experiment --flagfile={flagfile.relative_to(REPO)}" in flagfile.read_text()


@pytest.mark.parametrize("flagfile", COMPARISONS, ids=lambda p: p.stem)
def test_comparison_flagfile_names_runs_its_experiments_make(flagfile, monkeypatch):
    """Every --pair of a compare_runs flagfile names <results_dir>:<run> of an experiment or
    ablation flagfile beside it (the committed bundle, so the comparison reruns in a fresh
    checkout), and a run that experiment's grid trains: a typo fails here, not after hours of
    training. Each run of the ablation is paired with the main run at every factor."""
    from kd_histo.protocol.compare import RunRef

    monkeypatch.chdir(REPO)
    grids = {}
    experiments = EXPERIMENTS + ABLATIONS + ENSEMBLES + TEACHERS
    for path in [p for p in experiments if p.parent == flagfile.parent]:
        cfg = _experiment_config(path)
        names = set(plan_lib.run_names(cfg))
        # a borrowed teacher is the other experiment's run, not in this one's bundle
        grids[cfg.results_dir] = (cfg, names - {"teacher"} if cfg.teachers_from else names)
    lines = [ln for ln in flagfile.read_text().splitlines() if ln and not ln.startswith("#")]
    assert all(ln.startswith(("--pair=", "--out=", "--split=", "--n_boot=")) for ln in lines), lines
    pairs = [ln.removeprefix("--pair=").split(",", 2) for ln in lines if ln.startswith("--pair=")]
    assert pairs and all(len(p) == 3 and p[2].strip() for p in pairs)  # every row labelled
    refs = [RunRef.parse(r) for a, b, _ in pairs for r in (a, b)]
    for ref in refs:
        assert ref.experiment in grids, (
            f"{ref}: no flagfile beside {flagfile.name} has --results_dir={ref.experiment}"
        )
        assert ref.run in grids[ref.experiment][1], f"{ref}: not in that experiment's grid"
    for cfg, names in grids.values():  # an ablation's every run appears in some pair
        if cfg.results_dir.endswith(flagfile.stem.removeprefix("compare_")):
            assert names <= {r.run for r in refs if r.experiment == cfg.results_dir}, names
    assert (
        f"python tools/compare_runs.py --flagfile={flagfile.relative_to(REPO)}"
        in flagfile.read_text()
    )


@pytest.mark.parametrize("flagfile", TEACHERS, ids=lambda p: p.parent.name)
def test_ensemble_teachers_flagfile_trains_the_main_runs_teachers_where_the_ensemble_finds_them(
    flagfile, monkeypatch
):
    """The ensemble's teachers: the main run's teacher settings, seeds and folder (the ensemble's
    --teachers_from), nothing else trained, into a results folder of their own."""
    monkeypatch.chdir(REPO)
    cfg = _experiment_config(flagfile)
    main = _experiment_config(flagfile.parent / "experiment.flags")
    ensemble = _experiment_config(flagfile.parent / "ensemble.flags")
    assert cfg.out_dir == main.out_dir == ensemble.teachers_from and cfg.seeds == main.seeds
    assert cfg.base == main.base and plan_lib.run_names(cfg) == ["teacher"]
    assert cfg.results_dir not in (main.results_dir, ensemble.results_dir)
    assert f"kd-histo-experiment --flagfile={flagfile.relative_to(REPO)}" in flagfile.read_text()


@pytest.mark.parametrize("flagfile", ENSEMBLES, ids=lambda p: p.parent.name)
def test_ensemble_flagfile_trains_only_the_ensemble_students(flagfile, monkeypatch, tmp_path):
    """The ensemble row borrows its experiment's teachers (every seed's) and trains nothing else:
    each planned run is the experiment's teacher or a student of the ensemble of all of them."""
    monkeypatch.chdir(REPO)
    cfg = _experiment_config(flagfile)
    main = _experiment_config(flagfile.parent / "experiment.flags")
    assert cfg.teachers_from == main.out_dir and cfg.seeds == main.seeds
    assert cfg.base == dataclasses.replace(main.base, model_dir=cfg.base.model_dir)
    names = plan_lib.run_names(cfg)
    assert {n for n in names if n != "teacher"} == {
        f"student_ens_x{f:g}_unl100" for f in cfg.factors
    }
    assert f"kd-histo-experiment --flagfile={flagfile.relative_to(REPO)}" in flagfile.read_text()
