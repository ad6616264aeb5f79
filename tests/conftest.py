"""Shared fixtures: tiny TFRecord shards of synthetic H&E-like tiles, made in the test session.

``tiny_shards`` is a folder laid out exactly as kd-histo-convert writes it (``train``/``val``/
``test``/``unlabeled`` shards + ``dataset.json``), small enough for every test to use; tests that
need other sizes call ``support.write_tiny_shards`` themselves.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The kernels the binaries run (kd_histo/cli/flags_common.py): oneDNN on unless set otherwise.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import pytest  # noqa: E402
from support import shared_data_or_skip, write_tiny_shards  # noqa: E402


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """A read-only tiny data set folder (32 px tiles, 4 classes). Copy it before modifying."""
    return write_tiny_shards(tmp_path_factory.mktemp("tiny_shards"))


@pytest.fixture
def tiny_shards_without(tiny_shards, tmp_path):
    """``tiny_shards_without("val")``: a copy of ``tiny_shards`` without that split (shards and
    its dataset.json entries), for the cases where a split is missing."""
    import json
    import shutil

    def make(split: str) -> str:
        data = tmp_path / f"without_{split}"
        shutil.copytree(tiny_shards, data)
        for p in data.glob(f"{split}-*"):
            p.unlink()
        info = json.loads((data / "dataset.json").read_text())
        del info["counts"][split], info["shards"][split]
        (data / "dataset.json").write_text(json.dumps(info))
        return str(data)

    return make


@pytest.fixture
def shared_data():
    """``../shared/data`` beside the checkout; skips the test with a reason when it is absent."""
    return shared_data_or_skip()


def pytest_terminal_summary(terminalreporter):
    """One count line for the reliability cases (``make test-reliability``), beside pytest's own.

    Here, not in tests/reliability/: under xdist only this conftest is loaded in the controller.
    """
    outcomes = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            if "reliability" in getattr(report, "keywords", {}) and (
                report.when == "call" or outcome != "passed"
            ):
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
    if outcomes:
        ran = sum(outcomes.values())
        detail = ", ".join(f"{n} {k}" for k, n in outcomes.items())
        terminalreporter.write_line(f"reliability cases: {ran} ({detail})")
