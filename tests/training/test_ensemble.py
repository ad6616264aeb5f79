"""Ensemble teachers (issue 28, Deliver 1): the mean of the members' softened probabilities as
the KD target, one projection per member map, a cache keyed by every member, members checked."""

from __future__ import annotations

import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import TINY_NET_KW, TINY_PLANES, tiny_distill_config

from kd_histo.data.pipeline import PipelineConfig
from kd_histo.models import build_model, load_model
from kd_histo.training import losses as L
from kd_histo.training import preflight, teacher_cache, train
from kd_histo.training.config import DistillConfig
from kd_histo.training.distiller import ResolutionDistiller, losses_for
from kd_histo.training.ensemble import build_ensemble, ensemble_logits

KW = {**TINY_NET_KW, "planes": TINY_PLANES}


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_ensemble_logits_soften_to_the_mean_probability(temperature):
    rng = np.random.default_rng(0)
    members = [rng.normal(0, 6, (5, 4)).astype(np.float32) for _ in range(3)]
    z = ensemble_logits([tf.constant(m) for m in members], temperature).numpy()
    want = np.mean([_softmax(m.astype(np.float64) / temperature) for m in members], axis=0)
    np.testing.assert_allclose(_softmax(z / temperature), want, rtol=1e-5, atol=1e-7)
    # one member is that member (up to the logits' shift, which softmax ignores)
    one = ensemble_logits([tf.constant(members[0])], temperature).numpy()
    np.testing.assert_allclose(
        _softmax(one / temperature), _softmax(members[0] / temperature), rtol=1e-5
    )
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ensemble_logits([tf.constant(members[0])], 0.0)


def _members(n=2, classes=4, **kw):
    out = []
    for i in range(n):
        keras.utils.set_random_seed(10 + i)
        out.append(build_model("resnet_gn", classes, name="teacher", **{**KW, **kw}))
    return out


def test_tiny_ensemble_is_the_mean_of_its_members():
    a, b = _members()
    x = np.random.default_rng(1).random((3, 32, 32, 3), dtype=np.float32)
    ens = build_ensemble([a, b], ["A", "B"], temperature=4.0)
    out = ens(x)
    p = [_softmax(m(x)["logits"].numpy() / 4.0) for m in (a, b)]
    np.testing.assert_allclose(_softmax(out["logits"].numpy() / 4.0), np.mean(p, 0), rtol=1e-5)
    maps = [m(x)["features"].numpy() for m in (a, b)]
    np.testing.assert_array_equal(out["features"].numpy(), np.concatenate(maps, axis=-1))
    assert ens.feature_splits == (16, 16) and not ens.trainable
    off = build_ensemble(_members(), ["A", "B"], temperature=4.0, features=False)
    assert off.feature_splits == () and off.output["features"].shape[-1] == 16


def test_feature_loss_projects_the_student_once_per_member():
    student = build_model("resnet_gn", 4, name="student", **{**KW, "planes": (2, 4, 4, 8)})
    ens = build_ensemble(_members(), ["A", "B"], temperature=4.0)
    d = ResolutionDistiller(student, ens, losses_for(DistillConfig(), splits=ens.feature_splits))
    p0, p1 = d.feature_projections
    assert (p0.filters, p1.filters) == (16, 16)
    b = {
        "hr": np.random.default_rng(2).random((4, 32, 32, 3), dtype=np.float32),
        "lr": np.random.default_rng(3).random((4, 16, 16, 3), dtype=np.float32),
    }
    parts, _ = d.compute_losses(b)
    s = student(b["lr"])["features"]
    t = ens(b["hr"])["features"]
    plain = L.FeatureMapKD()
    want = [plain.compute_loss({"features": ti}, {"features": p(s)}) for p, ti in
            zip((p0, p1), tf.split(t, 2, axis=-1))]  # fmt: skip
    np.testing.assert_allclose(float(parts["feature_loss"]), float(np.mean(want)), rtol=1e-5)


def test_mismatched_members_are_refused_in_one_line():
    a, b = _members()
    wide = _members(1, planes=(4, 8, 8, 16), blocks=1)[0]
    wide_stride = build_model("resnet_gn", 4, name="t", **{**KW, "stem": "imagenet"})
    with pytest.raises(ValueError, match=r"member runs/b has a 2x2 feature map") as e:
        build_ensemble([a, wide_stride], ["runs/a", "runs/b"])
    assert "\n" not in str(e.value)
    build_ensemble([b, wide], ["runs/a", "runs/b"])  # same size: fine


# -- through train() ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teachers(tiny_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    return [
        train.train(
            tiny_distill_config(tiny_shards, root / f"t{s}", mode="teacher", seed=s)
        ).model_dir
        for s in (0, 1)
    ]


def test_student_of_a_two_member_ensemble_trains_end_to_end(tiny_shards, teachers, tmp_path):
    distill = DistillConfig(teacher=",".join(teachers))
    result = train.train(
        tiny_distill_config(tiny_shards, tmp_path / "s", mode="distill", distill=distill)
    )
    for name in ("kd_loss", "feature_loss"):
        assert all(np.isfinite(result.history[name])) and min(result.history[name]) > 0
    saved = load_model(os.path.join(result.model_dir, "model.keras"))
    assert not [layer for layer in saved._flatten_layers() if "projection" in layer.name]


def test_cache_is_invalidated_when_any_member_changes(tiny_shards, teachers, tmp_path):
    copies = []
    for i, t in enumerate(teachers):
        shutil.copytree(t, tmp_path / f"m{i}")
        copies.append(str(tmp_path / f"m{i}"))
    cfg = tiny_distill_config(
        tiny_shards,
        tmp_path / "s",
        mode="distill",
        distill=DistillConfig(teacher=",".join(copies)),
    )
    info = preflight.check_data(cfg)
    ens = preflight.load_teacher(cfg, info)
    source = preflight.teacher_source(cfg)
    builds = []
    kwargs = dict(map_size=(8, 8), feature_mode=L.FEATURE_MODE, log=builds.append)
    cache = str(tmp_path / "cache")
    teacher_cache.for_validation(ens, source, cfg.data, cache, **kwargs)
    teacher_cache.for_validation(ens, source, cfg.data, cache, **kwargs)
    assert len(builds) == 1  # reused while every member is unchanged
    meta = json.loads(open(os.path.join(cache, "val", teacher_cache.BUILT_FOR)).read())
    members = meta["settings"]["teacher"]["members"]
    assert [m["path"] for m in members] == [
        os.path.realpath(os.path.join(c, "model.keras")) for c in copies
    ]
    assert meta["settings"]["teacher"]["temperature"] == L.KD_TEMPERATURE
    keras.utils.set_random_seed(5)  # member 2 saved over with other weights
    other = build_model("resnet_gn", 4, mean=info.mean, std=info.std, name="teacher",
                        planes=(4, 8, 8, 16), stem="small")  # fmt: skip
    other.save(os.path.join(copies[1], "model.keras"))
    teacher_cache.for_validation(ens, source, cfg.data, cache, **kwargs)
    assert len(builds) == 2
    hotter = preflight.teacher_source(
        tiny_distill_config(tiny_shards, tmp_path / "s", mode="distill",
                            distill=DistillConfig(teacher=",".join(copies), temperature=2.0))
    )  # fmt: skip
    teacher_cache.for_validation(ens, hotter, cfg.data, cache, **kwargs)
    assert len(builds) == 3  # the ensemble's logits are for one temperature


def test_students_of_one_ensemble_share_its_cache_across_seeds(tiny_shards, teachers, tmp_path):
    """The protocol gives every seed's ensemble student one cache per factor: nothing seeded
    goes into it (the dihedral draws are made when a run reads it), so each seed's cache, built
    alone, is the same to the bit, and a seed finds the one built for another fitting."""

    def student(seed, cache):
        data = PipelineConfig(tiny_shards, batch_size=4, factor=2, augment="flips", seed=seed,
                              unlabeled_ratio=0.5)  # fmt: skip
        distill = DistillConfig(teacher=",".join(teachers), teacher_cache=str(cache))
        return tiny_distill_config(tiny_shards, tmp_path / f"s{seed}", mode="distill", seed=seed,
                                   data=data, distill=distill)  # fmt: skip

    built = [train.prebuild_teacher_caches([student(s, tmp_path / f"c{s}")]) for s in (0, 1)]
    assert built == [2, 2]  # training and val caches, each seed's own folder
    for name in ("keys.txt", "cache.json", "logits.f32", "features.float16", "val/logits.f32"):
        a, b = ((tmp_path / f"c{s}" / name).read_bytes() for s in (0, 1))
        assert a == b and len(a) > 0, name
    assert train.prebuild_teacher_caches([student(1, tmp_path / "c0")]) == 0


def test_a_member_that_does_not_fit_is_named(tiny_shards, teachers, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(teachers[1], odd)
    record = json.loads((odd / "run.json").read_text())
    record["mpp"] = 1.0
    (odd / "run.json").write_text(json.dumps(record))
    cfg = tiny_distill_config(
        tiny_shards,
        tmp_path / "s",
        mode="distill",
        distill=DistillConfig(teacher=f"{teachers[0]},{odd}"),
    )
    with pytest.raises(preflight.PreflightError) as e:
        train.train(cfg)
    assert str(e.value).startswith(f"teacher {odd} was trained on 1 µm/px tiles")
    assert "\n" not in str(e.value) and not os.path.exists(cfg.model_dir)
