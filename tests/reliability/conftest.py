"""Fixtures of the reliability tests: a tiny teacher run folder trained once per session."""

from __future__ import annotations

import pytest

from kd_histo.data.pipeline import PipelineConfig
from kd_histo.training import train

from .helpers import tiny_config


@pytest.fixture(scope="session")
def teacher_run(tiny_shards, tmp_path_factory) -> str:
    """A finished teacher run folder on ``tiny_shards`` (32 px, 4 classes). Read-only."""
    model_dir = tmp_path_factory.mktemp("rel_runs") / "teacher"
    train.train(
        tiny_config(
            tiny_shards, model_dir, data=PipelineConfig(str(tiny_shards), batch_size=4, factor=2.0)
        )
    )
    return str(model_dir)
