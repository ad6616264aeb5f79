"""Fixtures of the reliability tests: a tiny teacher run folder trained once per session."""

from __future__ import annotations

import pytest

from kd_histo.data.pipeline import PipelineConfig
from kd_histo.training import train
from kd_histo.training.config import NetConfig, RunConfig

TINY_NET = NetConfig(planes=(4, 8, 8, 16), kwargs=(("stem", "small"),))


def tiny_run(data_dir, model_dir, mode="teacher", **kw) -> str:
    """Trains a tiny run (1 epoch of 2 steps) into ``model_dir``; returns it."""
    data = kw.pop("data", None) or PipelineConfig(str(data_dir), batch_size=4, factor=kw.pop("factor", 2.0))
    cfg = RunConfig(mode=mode, model_dir=str(model_dir), data=data, net=TINY_NET, epochs=1,
                    steps_per_epoch=2, val_steps=1, verbose=0, profile_steps=(0, 0), image_grids=False, **kw)
    train.train(cfg)
    return str(model_dir)


@pytest.fixture(scope="session")
def teacher_run(tiny_shards, tmp_path_factory) -> str:
    """A finished teacher run folder on ``tiny_shards`` (32 px, 4 classes). Read-only."""
    return tiny_run(tiny_shards, tmp_path_factory.mktemp("rel_runs") / "teacher")

