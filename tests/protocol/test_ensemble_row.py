"""The protocol's ensemble-teacher row (issue 28): ``student_ens_*`` students learn from the
ensemble of every seed's teacher (``teachers_from``'s), each factor with one teacher cache for
every seed's students (the ensemble is the same for all), and only these rows train when the
single-teacher students and baselines are off."""

import dataclasses

import pytest

from kd_histo.data.pipeline import PipelineConfig
from kd_histo.protocol.plan import ExperimentConfig, plan, teacher_run_dir
from kd_histo.training.config import DistillConfig, NetConfig, RunConfig


def _cfg(data_dir, out_dir, **kw) -> ExperimentConfig:
    base = RunConfig(mode="teacher", model_dir="unused",
                     data=PipelineConfig(data_dir, batch_size=4, shuffle_buffer=16),
                     net=NetConfig(planes=(4, 8, 8, 16)), epochs=1,
                     distill=DistillConfig(teacher_cache="auto"))  # fmt: skip
    return ExperimentConfig(out_dir=str(out_dir), base=base, factors=(2.0, 4.0),
                            unlabeled_fractions=(0.0, 1.0), n_boot=50, **kw)  # fmt: skip


def test_ensemble_students_read_every_seeds_teacher(tiny_shards, tmp_path):
    cfg = _cfg(tiny_shards, tmp_path / "ens", seeds=(0, 1, 2), teachers_from=str(tmp_path / "main"),
               baselines=False, students=False, labeled_student_ce=0.0,
               ensemble_students=True)  # fmt: skip
    specs = plan(cfg)
    trained = [s for s in specs if s.kind != "teacher"]
    assert {(s.name, s.seed) for s in trained} == {
        (f"student_ens_x{f}_unl100", seed) for f in (2, 4) for seed in (0, 1, 2)
    }
    members = ",".join(teacher_run_dir(cfg, s) for s in (0, 1, 2))
    assert all(s.config.distill.teacher == members for s in trained)
    assert all(s.config.mode == "distill" and s.config.distill.ce_weight == 0 for s in trained)
    # one ensemble for every seed: its students share one cache per factor, not one per seed
    caches = {(s.factor, s.config.distill.teacher_cache) for s in trained}
    runs = tmp_path / "ens" / "runs"
    assert caches == {(f, str(runs / f"teacher_cache_ens_x{f:g}")) for f in (2.0, 4.0)}
    # the default grid has no such row
    plain = _cfg(tiny_shards, tmp_path / "plain")
    assert not any(s.kind == "student_ens" for s in plan(plain))
    assert any(s.kind == "student" for s in plan(plain))


def test_only_the_ensembles_students_share_a_cache_across_seeds(tiny_shards, tmp_path):
    cfg = _cfg(tiny_shards, tmp_path, seeds=(0, 1), teachers_from=str(tmp_path / "main"),
               baselines=False, labeled_student_ce=0.0, ensemble_students=True)  # fmt: skip
    caches = {}
    for s in plan(cfg):
        if s.config.mode == "distill" and s.factor == 4.0:
            caches.setdefault(s.kind, set()).add(s.config.distill.teacher_cache)
    assert caches["student_ens"] == {str(tmp_path / "runs" / "teacher_cache_ens_x4")}
    assert caches["student"] == {str(tmp_path / "runs" / f"s{seed}" / "teacher_cache_x4")
                                 for seed in (0, 1)}  # fmt: skip
    off = dataclasses.replace(cfg, base=dataclasses.replace(
        cfg.base, distill=DistillConfig(teacher_cache="")))  # fmt: skip
    assert all(s.config.distill.teacher_cache == "" for s in plan(off))


def test_ensemble_students_need_the_seeds_teachers_trained_first(tiny_shards, tmp_path):
    with pytest.raises(ValueError, match="--teachers_from=<experiment folder> and two --seeds"):
        _cfg(tiny_shards, tmp_path, seeds=(0, 1), ensemble_students=True)
    with pytest.raises(ValueError, match="two --seeds"):
        _cfg(tiny_shards, tmp_path, teachers_from=str(tmp_path), ensemble_students=True)
    ok = _cfg(tiny_shards, tmp_path, seeds=(0, 1), teachers_from=str(tmp_path))
    assert dataclasses.replace(ok, ensemble_students=True).ensemble_students
