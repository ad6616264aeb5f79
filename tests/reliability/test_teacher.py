"""The teacher a student learns from: a shared teacher cache that must not go stale when the data
folder is reconverted or the teacher file replaced, and a teacher trained on other classes (or
another order of them), another tile size or µm/px, or at low resolution, which training refuses."""

import dataclasses
import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import write_tiny_shards

from kd_histo.cli import flags_common as fc
from kd_histo.cli import train as train_cli
from kd_histo.data.pipeline import PipelineConfig, make_dataset
from kd_histo.models import build_model
from kd_histo.training import preflight
from kd_histo.training import teacher_cache as TC
from kd_histo.training.config import DistillConfig, RunConfig
from kd_histo.training.run_record import read_run_record, write_run_record

pytestmark = pytest.mark.reliability

KW = dict(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], planes=(4, 8, 8, 16), stem="small")


def _cache(teacher, path, data_dir, cache_dir, log):
    cfg = PipelineConfig(str(data_dir), batch_size=4, factor=2, augment="none")
    return TC.for_training(
        teacher, path, cfg, str(cache_dir), map_size=(2, 2), feature_mode="maxpool", log=log
    )


def _assert_cache_is_the_teachers(cache, teacher, data_dir):
    cfg = PipelineConfig(str(data_dir), batch_size=8, factor=2, augment="none")
    batch = next(iter(make_dataset(cfg, "train", training=False)))
    logits, _ = cache.lookup(cache.rows(batch), tf.zeros([8], tf.int32))
    real = teacher(batch["hr"], training=False)["logits"].numpy()
    np.testing.assert_allclose(logits.numpy(), real, rtol=1e-5, atol=1e-5)


def test_teacher_cache_is_rebuilt_when_the_data_or_the_teacher_changes(tmp_path):
    keras.utils.set_random_seed(0)
    teacher = build_model("resnet_gn", 4, name="teacher", **KW)
    path = str(tmp_path / "teacher.keras")
    teacher.save(path)
    data, cache_dir = tmp_path / "data", tmp_path / "cache"
    write_tiny_shards(data, per_class=2, num_shards=1, unlabeled=0, seed=0)
    built = []
    cache = _cache(teacher, path, data, cache_dir, built.append)
    assert len(built) == 1
    _assert_cache_is_the_teachers(cache, teacher, data)
    _cache(teacher, path, data, cache_dir, built.append)
    assert len(built) == 1  # same data, same teacher: reused
    os.symlink(tmp_path, tmp_path.parent / f"{tmp_path.name}_link")
    link = tmp_path.parent / f"{tmp_path.name}_link"
    _cache(teacher, str(link / "teacher.keras"), link / "data", cache_dir, built.append)
    assert len(built) == 1  # the same files reached through a symlink (another worktree): reused

    # the folder reconverted with other settings: same paths, same record keys, other pixels
    write_tiny_shards(data, per_class=2, num_shards=1, unlabeled=0, seed=7)
    cache = _cache(teacher, path, data, cache_dir, built.append)
    assert len(built) == 2, "a reconverted data folder must rebuild the cache"
    _assert_cache_is_the_teachers(cache, teacher, data)

    # another teacher saved over the file, its size and mtime as before (a copy keeping times)
    before = os.stat(path)
    other = build_model("resnet_gn", 4, name="teacher", **KW)  # new random weights
    other.save(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.path.getsize(path) == before.st_size
    cache = _cache(other, path, data, cache_dir, built.append)
    assert len(built) == 3, "another teacher file must rebuild the cache"
    _assert_cache_is_the_teachers(cache, other, data)


# -- the teacher/student contract: what the teacher was trained on must be what the data is ------
def _distill(capsys, data_dir, teacher, model_dir) -> tuple[int, str]:
    code = fc.invoke(
        train_cli.PROG,
        train_cli.main,
        [
            "--mode=distill",
            f"--data_dir={data_dir}",
            f"--teacher={teacher}",
            f"--model_dir={model_dir}",
            "--factor=2",
            "--planes=4,8,8,16",
            "--stem=small",
            "--batch_size=4",
            "--epochs=1",
            "--steps_per_epoch=2",
            "--val_steps=1",
            "--profile_steps=0,0",
            "--verbose=0",
        ],
    )
    return code, capsys.readouterr().err.strip()


def _with_dataset_json(tiny_shards, dst, **changes) -> str:
    shutil.copytree(tiny_shards, dst)
    info = json.loads((dst / "dataset.json").read_text())
    info.update(changes)
    (dst / "dataset.json").write_text(json.dumps(info))
    return str(dst)


def _refused(code, err, *words):
    assert code == 2, err[-2000:]
    assert err.startswith("kd-histo-train: error: teacher") and "\n" not in err, err
    assert all(w in err for w in words), err


def test_teacher_with_the_classes_in_another_order_is_refused(
    tiny_shards, teacher_run, tmp_path, capsys
):
    names = json.loads(open(os.path.join(tiny_shards, "dataset.json")).read())["class_names"]
    data = _with_dataset_json(
        tiny_shards, tmp_path / "d", class_names=names[::-1]
    )  # as --class_names does
    code, err = _distill(capsys, data, teacher_run, tmp_path / "m")
    _refused(code, err, "another order", ",".join(names))
    assert not (tmp_path / "m").exists()


def test_teacher_of_another_tile_size_or_resolution_is_refused(
    tiny_shards, teacher_run, tmp_path, capsys
):
    small = write_tiny_shards(tmp_path / "d16", tile_px=16, per_class=2, num_shards=1, unlabeled=0)
    _refused(*_distill(capsys, small, teacher_run, tmp_path / "m"), "32 px", "16 px")
    coarse = _with_dataset_json(tiny_shards, tmp_path / "d_mpp", mpp=1.0)  # teacher: 0.5 µm/px
    _refused(*_distill(capsys, coarse, teacher_run, tmp_path / "m"), "0.5 µm/px", "1 µm/px")
    assert not (tmp_path / "m").exists()


def test_low_resolution_student_as_teacher_is_refused(tiny_shards, teacher_run, tmp_path, capsys):
    # a baseline x2 run folder: the teacher's files with the record an LR run gets from training
    baseline = tmp_path / "baseline"
    shutil.copytree(teacher_run, baseline)
    record = dataclasses.replace(
        read_run_record(teacher_run), mode="baseline", view="lr", factor=2.0, input_px=16
    )
    write_run_record(str(baseline), record)
    _refused(*_distill(capsys, tiny_shards, baseline, tmp_path / "m"), "low-resolution", "view lr")
    assert not (tmp_path / "m").exists()


def test_bare_model_file_as_teacher_is_refused(tiny_shards, teacher_run, tmp_path, capsys):
    bare = tmp_path / "elsewhere" / "teacher.keras"
    bare.parent.mkdir()
    shutil.copy(os.path.join(teacher_run, "model.keras"), bare)
    _refused(*_distill(capsys, tiny_shards, bare, tmp_path / "m"), "no run.json", "run folder")
    assert not (tmp_path / "m").exists()
    # the same file inside its run folder is its run record's model: accepted
    cfg = RunConfig(
        mode="distill",
        model_dir=str(tmp_path / "m"),
        data=PipelineConfig(tiny_shards),
        distill=DistillConfig(teacher=os.path.join(teacher_run, "model.keras")),
    )
    assert preflight.teacher_record(cfg).class_names == tuple(
        json.load(open(os.path.join(tiny_shards, "dataset.json")))["class_names"]
    )
