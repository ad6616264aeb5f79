"""Distillation reading the teacher's outputs from a cache: built once, shared, rebuilt if stale."""

import json
import logging
import os

import numpy as np
import pytest

from kd_histo.data.pipeline import PipelineConfig
from kd_histo.training import preflight, train
from kd_histo.training.cache_store import TeacherCache
from kd_histo.training.config import DistillConfig, NetConfig, RunConfig
from kd_histo.training.teacher_cache import BUILT_FOR

TINY_NET = NetConfig(planes=(4, 8, 8, 16), stem="small")


def _cfg(data_dir, model_dir, mode="teacher", distill=DistillConfig(), **data_kw):
    data = PipelineConfig(
        data_dir, batch_size=4, factor=2, augment=data_kw.pop("augment", "flips"), **data_kw
    )
    return RunConfig(
        mode=mode,
        model_dir=str(model_dir),
        data=data,
        net=TINY_NET,
        distill=distill,
        epochs=2,
        steps_per_epoch=2,
        val_steps=1,
        verbose=0,
        profile_steps=(0, 0),
        image_grids=False,
    )


@pytest.fixture(scope="module")
def teacher(tiny_shards, tmp_path_factory):
    return train.train(_cfg(tiny_shards, tmp_path_factory.mktemp("t") / "teacher")).model_dir


def _student(data_dir, model_dir, teacher_dir, cache, mode="distill", **data_kw):
    distill = DistillConfig(teacher=teacher_dir, teacher_cache=str(cache))
    return _cfg(data_dir, model_dir, mode=mode, distill=distill, **data_kw)


def test_cached_run_trains_the_student_from_the_cache(tiny_shards, teacher, tmp_path, caplog):
    cache = tmp_path / "cache"
    cfg = _student(tiny_shards, tmp_path / "s1", teacher, cache, unlabeled_ratio=0.5)
    with caplog.at_level(logging.INFO, logger="kd_histo"):
        result = train.train(cfg)
    assert "running the teacher 8x over 2 source(s)" in caplog.text
    meta = json.loads((cache / BUILT_FOR).read_text())
    assert sorted(s[1] for s in meta["sources"]) == ["train", "unlabeled"]
    spec = TeacherCache(str(cache)).spec
    assert spec.num_examples == 16 + 8 and spec.num_transforms == 8  # train + unlabeled tiles
    losses = result.history["kd_loss"] + result.history["feature_loss"]
    assert all(np.isfinite(losses)) and max(losses) > 0
    assert {k for k in result.history if k.endswith("loss")} == {  # the active losses only
        "loss",
        "kd_loss",
        "feature_loss",
        "val_loss",
        "val_kd_loss",
        "val_feature_loss",
    }
    assert os.path.isfile(os.path.join(cfg.model_dir, "model.keras"))


def test_validation_reads_the_teachers_val_outputs_from_their_own_cache(
    tiny_shards, teacher, tmp_path
):
    """Validation runs no teacher: ``<cache>/val`` holds its outputs on the val tiles (identity
    view only), equal to the live teacher's on the same batches."""
    import tensorflow as tf

    from kd_histo.data.pipeline import make_dataset
    from kd_histo.models import load_model
    from kd_histo.training import losses as L
    from kd_histo.training.teacher_cache import VALIDATION_SUBDIR, for_validation

    cache = tmp_path / "cache"
    history = train.train(_student(tiny_shards, tmp_path / "s", teacher, cache)).history
    assert all(np.isfinite(history["val_kd_loss"])) and all(
        np.isfinite(history["val_feature_loss"])
    )
    meta = json.loads((cache / VALIDATION_SUBDIR / BUILT_FOR).read_text())
    assert [s[1] for s in meta["sources"]] == ["val"] and meta["settings"]["dihedral"] is False
    spec = TeacherCache(str(cache / VALIDATION_SUBDIR)).spec
    assert (spec.num_examples, spec.num_transforms) == (8, 1)  # the 8 val tiles, identity only

    model = os.path.join(teacher, "model.keras")
    net = load_model(model)
    data = PipelineConfig(tiny_shards, batch_size=4, factor=2, augment="flips")
    lines = []
    val_cache = for_validation(net, model, data, str(cache), map_size=spec.map_size,
                               feature_mode="maxpool+bicubic", log=lines.append)  # fmt: skip
    assert lines == []  # reused: it fits this teacher and these views
    target = L.FeatureMapKD("maxpool+bicubic").target
    seen = 0
    for batch in val_cache.attach(make_dataset(data, "val", training=False), training=False):
        live = net(batch["hr"], training=False)
        np.testing.assert_allclose(batch["teacher_logits"], live["logits"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            batch["teacher_features"], target(live["features"], spec.map_size), rtol=1e-2, atol=1e-2
        )  # stored as float16
        seen += int(tf.shape(batch["lr"])[0])
    assert seen == 8


def test_cached_student_also_learns_from_labels_where_they_exist(tiny_shards, teacher, tmp_path):
    """The protocol's student_ce run: KD from the cache plus cross-entropy on the labeled tiles."""
    distill = DistillConfig(teacher=teacher, teacher_cache=str(tmp_path / "cache"), ce_weight=0.5)
    cfg = _cfg(tiny_shards, tmp_path / "s", mode="distill", distill=distill, unlabeled_ratio=0.5)
    history = train.train(cfg).history
    assert all(np.isfinite(history["ce_loss"])) and min(history["ce_loss"]) > 0
    assert max(history["kd_loss"]) > 0
    assert not {"ssl_loss", "at_loss"} & set(history)  # ssl_weight = at_weight = 0: no columns


def test_cache_is_reused_grown_or_rebuilt_as_runs_need(tiny_shards, teacher, tmp_path):
    from kd_histo.models import load_model
    from kd_histo.training.teacher_cache import for_training

    model = os.path.join(teacher, "model.keras")
    net = load_model(model)
    lines = []

    def cache_for(**data_kw):
        data = PipelineConfig(
            tiny_shards, factor=2, augment=data_kw.pop("augment", "flips"), **data_kw
        )
        return for_training(net, model, data, str(tmp_path / "cache"), map_size=(2, 2),
                            feature_mode="maxpool+bicubic", log=lines.append)  # fmt: skip

    assert cache_for().spec.num_examples == 16 and len(lines) == 1  # train split only
    assert (
        cache_for(unlabeled_ratio=0.5).spec.num_examples == 24 and len(lines) == 2
    )  # grown to the union
    stamp = os.path.getmtime(tmp_path / "cache" / "features.float16")
    # Inside the covered sources (train, or only the pool): reused as it is.
    assert cache_for().spec.num_examples == 24 and cache_for(labeled=False).spec.num_examples == 24
    assert len(lines) == 2 and os.path.getmtime(tmp_path / "cache" / "features.float16") == stamp
    st = os.stat(model)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a retrained teacher file
    assert cache_for().spec.num_examples == 16 and "8x over 1 source(s)" in lines[-1]
    assert json.loads((tmp_path / "cache" / BUILT_FOR).read_text())["settings"]["teacher"][
        "mtime_ns"
    ] == (st.st_mtime_ns + 10**9)
    assert cache_for(augment="none").spec.num_transforms == 1  # no flips: the identity only
    with pytest.raises(ValueError, match="not 'paper'; use --augment=flips"):
        cache_for(augment="paper")
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"augment": "paper"}, "holds the flips/rotations only, not augment 'paper'"),
        ({"hr_px": 24}, "--hr_px 24 makes random crops of the 32 px tiles"),
        ({"mode": "baseline"}, "--teacher_cache is for distill runs, not 'baseline'"),
    ],
)
def test_what_a_cache_cannot_hold_is_refused_before_anything_is_written(
    tiny_shards, teacher, tmp_path, change, match
):
    mode = change.pop("mode", "distill")
    cfg = _student(tiny_shards, tmp_path / "run", teacher, "auto", mode=mode, **change)
    with pytest.raises(preflight.PreflightError, match=match):
        train.train(cfg)
    assert not (tmp_path / "run").exists()


def test_prebuilt_caches_are_the_ones_each_run_builds_and_the_runs_train_the_same(
    tiny_shards, teacher, tmp_path, caplog
):
    """One teacher pass fills the caches of the x2 and x4 students (train and val); each equals,
    to the bit, the cache its run builds alone, and a run that finds its cache prebuilt trains
    exactly as the run that built its own."""
    import dataclasses

    from kd_histo.models import load_model
    from kd_histo.training import teacher_cache

    def build_alone(cfg):
        info = preflight.check_data(cfg)
        net = train.build_model(cfg.net.arch, info.num_classes, mean=info.mean, std=info.std,
                                **cfg.net.build_kwargs())  # fmt: skip
        kwargs = {
            "map_size": train._map_size(net, preflight.check_input_size(cfg, info, net)),
            "feature_mode": cfg.distill.feature_mode,
            "log": lambda _: None,
        }
        net = load_model(train.model_file(teacher))
        teacher_cache.for_training(
            net, train.model_file(teacher), cfg.data, cfg.distill.teacher_cache, **kwargs
        )
        teacher_cache.for_validation(
            net, train.model_file(teacher), cfg.data, cfg.distill.teacher_cache, **kwargs
        )

    alone = {
        f: _student(
            tiny_shards,
            tmp_path / f"alone_x{f}",
            teacher,
            tmp_path / f"alone_cache_x{f}",
            unlabeled_ratio=0.5,
        )
        for f in (2, 4)
    }
    alone = {
        f: dataclasses.replace(c, data=dataclasses.replace(c.data, factor=f))
        for f, c in alone.items()
    }
    history = train.train(alone[2]).history
    build_alone(alone[4])  # what the x4 run would build before its first step
    pre = {
        f: dataclasses.replace(
            c,
            model_dir=str(tmp_path / f"pre_x{f}"),
            distill=dataclasses.replace(c.distill, teacher_cache=str(tmp_path / f"pre_cache_x{f}")),
        )
        for f, c in alone.items()
    }
    # Last, a run sharing the x2 cache that draws no unlabeled tiles: the cache still covers both
    # sources.
    labeled_only = dataclasses.replace(
        pre[2],
        model_dir=str(tmp_path / "pre_x2_labeled"),
        data=dataclasses.replace(pre[2].data, unlabeled_ratio=0.0),
    )
    lines = []
    assert (
        train.prebuild_teacher_caches([*pre.values(), labeled_only], log=lines.append) == 4
    )  # 2 train + 2 val
    runs = [line for line in lines if "running the teacher" in line]
    assert len(runs) == 2 and "8x over 2 source(s)" in runs[0] and "1x over 1 source(s)" in runs[1]
    assert all(
        "pre_cache_x2" in line and "pre_cache_x4" in line for line in runs
    )  # one pass for both
    for f in (2, 4):
        for sub in ("", "val"):
            a, b = (
                TeacherCache(str(tmp_path / f"alone_cache_x{f}" / sub)),
                TeacherCache(str(tmp_path / f"pre_cache_x{f}" / sub)),
            )
            assert a.spec == b.spec and a.keys == b.keys
            np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))
            np.testing.assert_array_equal(np.asarray(a.features), np.asarray(b.features))
    assert (
        TeacherCache(str(tmp_path / "pre_cache_x4")).spec.map_size
        != TeacherCache(str(tmp_path / "pre_cache_x2")).spec.map_size
    )
    assert train.prebuild_teacher_caches(list(pre.values()), log=lines.append) == 0  # they fit now
    caplog.clear()  # only this run's records (a binary run earlier may have set INFO already)
    with caplog.at_level(logging.INFO, logger="kd_histo"):
        result = train.train(pre[2])
    # found its cache: built nothing (a build is logged here, test_cached_run_trains_...)
    assert "running the teacher" not in caplog.text
    assert result.history == history
