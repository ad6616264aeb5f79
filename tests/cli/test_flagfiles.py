"""Every flagfile in flags/ parses into a valid RunConfig with the paper's settings."""

import pathlib

import pytest
from cli_helpers import BINARIES

from kd_histo.cli import flags_common as fc

ROOT = pathlib.Path(__file__).resolve().parents[2]
FLAGFILES = sorted(p for p in (ROOT / "flags").rglob("*.flags") if p.name != "common.flags")


def _config(flagfile):
    fc.FLAGS.unparse_flags()
    try:
        fc.FLAGS(["kd-histo-train", f"--flagfile={flagfile.relative_to(ROOT)}"])
        return BINARIES["train"].config_from_flags()
    finally:
        fc.FLAGS.unparse_flags()


def test_the_issue_asks_for_these_flagfiles():
    names = {str(p.relative_to(ROOT / "flags")) for p in FLAGFILES}
    want = {f"{d}/{n}.flags" for d in ("demo", "tiles") for n in
            ("teacher", "baseline_x2", "baseline_x4", "baseline_x8", "student_x2", "student_x4", "student_x8")}
    assert want | {"tiles/student_x4_unlabeled.flags", "demo/student_x4_unlabeled.flags"} <= names


@pytest.mark.parametrize("flagfile", FLAGFILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_flagfile_resolves(flagfile, monkeypatch):
    monkeypatch.chdir(ROOT)  # nested --flagfile paths are relative to the repository root
    cfg = _config(flagfile)
    assert cfg.optim.name == "adam" and cfg.optim.learning_rate == 1e-3 and cfg.optim.weight_decay == 1e-4
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
