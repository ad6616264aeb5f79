"""Runs trained once per test session for the CLI tests: teacher, baseline x2, student x2."""

import pytest

from .cli_helpers import train_run


@pytest.fixture(scope="session")
def runs(tiny_shards, tmp_path_factory):
    """Run folders trained by kd-histo-train in-process on tiny shards (tiny nets, 2x2 steps)."""
    root = tmp_path_factory.mktemp("runs")
    assert train_run(tiny_shards, root / "teacher", "teacher") == 0
    assert train_run(tiny_shards, root / "baseline_x2", "baseline", "--factor=2") == 0
    assert (
        train_run(
            tiny_shards,
            root / "student_x2",
            "distill",
            "--factor=2",
            f"--teacher={root / 'teacher'}",
            "--unlabeled_ratio=0.5",
        )
        == 0
    )
    return root
