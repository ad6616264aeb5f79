"""A run started before a setting existed resumes: its config.json lacks the setting, which had
its default then (e.g. distill.ensemble_features, added with ensemble teachers)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from support import tiny_run_config

from kd_histo.training import preflight
from kd_histo.training.config import DistillConfig


def test_unfinished_run_without_a_newer_setting_resumes(tmp_path):
    cfg = tiny_run_config(str(tmp_path / "data"), tmp_path / "run")
    os.makedirs(cfg.model_dir)
    old = json.loads(cfg.to_json())
    del old["distill"]["ensemble_features"]  # what a run started before it leaves
    (tmp_path / "run" / "config.json").write_text(json.dumps(old))
    preflight.check_model_dir(cfg)
    off = dataclasses.replace(
        cfg, distill=dataclasses.replace(cfg.distill, ensemble_features="off")
    )
    with pytest.raises(preflight.PreflightError, match=r"other settings \(distill\)"):
        preflight.check_model_dir(off)


def test_unfinished_run_resumes_where_its_teacher_cache_moved(tmp_path):
    """The protocol's ensemble students had a cache per seed (``runs/s<seed>/teacher_cache_ens_x8``)
    and now share one per factor: a cache is the same outputs wherever it lies, so a run started
    with the old folder resumes with the new; reading a cache or not is still a setting."""
    teachers = ",".join(str(tmp_path / "runs" / f"s{s}" / "teacher") for s in (0, 1, 2))
    cfg = tiny_run_config(str(tmp_path / "data"), tmp_path / "run", mode="distill",
                          distill=DistillConfig(teacher=teachers))  # fmt: skip

    def cached(path):
        return dataclasses.replace(
            cfg, distill=dataclasses.replace(cfg.distill, teacher_cache=path)
        )

    os.makedirs(cfg.model_dir)
    old = cached(str(tmp_path / "runs" / "s1" / "teacher_cache_ens_x8"))
    (tmp_path / "run" / "config.json").write_text(old.to_json())
    preflight.check_model_dir(cached(str(tmp_path / "runs" / "teacher_cache_ens_x8")))
    preflight.check_model_dir(cached("auto"))
    with pytest.raises(preflight.PreflightError, match=r"other settings \(distill\)"):
        preflight.check_model_dir(cached(""))
    (tmp_path / "run" / "config.json").write_text(cached("").to_json())
    with pytest.raises(preflight.PreflightError, match=r"other settings \(distill\)"):
        preflight.check_model_dir(cached(str(tmp_path / "runs" / "teacher_cache_ens_x8")))
    moved = dataclasses.replace(old, distill=dataclasses.replace(old.distill, temperature=2.0))
    with pytest.raises(preflight.PreflightError, match=r"other settings \(distill\)"):
        preflight.check_model_dir(moved)  # the rest of distill is still compared
