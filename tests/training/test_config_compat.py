"""A run started before a setting existed resumes: its config.json lacks the setting, which had
its default then (e.g. distill.ensemble_features, added with ensemble teachers)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from support import tiny_run_config

from kd_histo.training import preflight


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
