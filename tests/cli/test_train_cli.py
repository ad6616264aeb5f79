"""kd-histo-train in-process: the three modes, the run folder, and one-line errors on bad input."""

import json
import os

import pytest

from .cli_helpers import copy_data, invoke, train_run


def test_run_folders_hold_the_contract_files(runs):
    for name in ("teacher", "baseline_x2", "student_x2"):
        d = runs / name
        for f in (
            "config.json",
            "run.json",
            "model.keras",
            "history.csv",
            "savedmodel/saved_model.pb",
        ):
            assert (d / f).exists(), f"{name}/{f} missing"
        run = json.load(open(d / "run.json"))
        from kd_histo.data import synthetic

        assert run["class_names"] == list(synthetic.CLASS_NAMES)
    assert json.load(open(runs / "teacher" / "run.json"))["input_px"] == 32
    assert json.load(open(runs / "student_x2" / "run.json"))["input_px"] == 16
    assert json.load(open(runs / "student_x2" / "run.json"))["view"] == "lr"


def test_distill_logs_kd_and_feature_losses(runs):
    header, *rows = open(runs / "student_x2" / "history.csv").read().splitlines()
    cols = header.split(",")
    assert len(rows) == 2
    kd, feat = (float(rows[-1].split(",")[cols.index(c)]) for c in ("kd_loss", "feature_loss"))
    assert kd > 0 and feat > 0
    # label-free by default: only the active losses (kd + feature) and their total are logged
    assert [c for c in cols if c.endswith("loss")] == [
        "feature_loss",
        "kd_loss",
        "loss",
        "val_feature_loss",
        "val_kd_loss",
        "val_loss",
    ]
    teacher_cols = open(runs / "teacher" / "history.csv").readline().strip().split(",")
    assert [c for c in teacher_cols if c.endswith("loss")] == [
        "ce_loss",
        "loss",
        "val_ce_loss",
        "val_loss",
    ]


def test_config_json_round_trips(runs):
    from kd_histo.training.config import RunConfig

    text = open(runs / "student_x2" / "config.json").read()
    cfg = RunConfig.from_json(text)
    assert cfg.mode == "distill" and cfg.data.factor == 2.0 and cfg.net.planes == (4, 8, 8, 16)
    assert json.loads(cfg.to_json()) == json.loads(text)


def test_tensorboard_has_per_loss_scalars_and_image_grids(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = runs / "student_x2" / "logs"
    train_dir = str(logs / "train")
    acc = EventAccumulator(train_dir, size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    assert {"epoch_kd_loss", "epoch_feature_loss", "epoch_loss"} <= tags
    assert not {"epoch_ce_loss", "epoch_ssl_loss", "epoch_at_loss"} & tags  # weight 0: no scalars
    assert {"samples/hr", "samples/lr"} <= tags


def _err(capsys) -> str:
    return capsys.readouterr().err.strip()


def test_unknown_flag_is_one_line(tiny_shards, tmp_path, capsys):
    assert invoke("train", "--mode=teacher", "--no_such_flag=1") == 2
    err = _err(capsys)
    assert err.startswith("kd-histo-train: error:") and "no_such_flag" in err and "\n" not in err


def test_missing_data_dir_says_what_to_do(tmp_path, capsys):
    assert train_run(tmp_path / "nope", tmp_path / "m", "teacher") == 2
    err = _err(capsys)
    assert (
        err.startswith("kd-histo-train: error:") and "kd-histo-convert" in err and "\n" not in err
    )
    assert not (tmp_path / "m").exists()


def test_missing_teacher_file(tiny_shards, tmp_path, capsys):
    assert train_run(tiny_shards, tmp_path / "m", "distill", f"--teacher={tmp_path / 'none'}") == 2
    assert "teacher" in _err(capsys) and not (tmp_path / "m").exists()


def test_teacher_with_other_class_count(runs, tmp_path, capsys):
    import keras

    from kd_histo.models import build_model

    wrong = build_model(
        "resnet_gn", 3, mean=[0.5] * 3, std=[0.25] * 3, planes=(4, 8, 8, 16), stem="small"
    )
    keras.saving.save_model(wrong, tmp_path / "t3.keras")
    assert (
        train_run(
            runs.parent / "x", tmp_path / "m", "distill", f"--teacher={tmp_path / 't3.keras'}"
        )
        == 2
    )
    _err(capsys)
    data = json.load(open(runs / "teacher" / "config.json"))["data"]["data_dir"]
    assert train_run(data, tmp_path / "m", "distill", f"--teacher={tmp_path / 't3.keras'}") == 2
    err = _err(capsys)
    assert "3 classes" in err and "4" in err and not (tmp_path / "m").exists()


@pytest.mark.reliability
def test_teacher_with_other_input_channels(tiny_shards, tmp_path, capsys):
    import keras

    inputs = keras.Input((None, None, 1))
    f = keras.layers.Conv2D(16, 3)(inputs)
    net = keras.Model(
        inputs,
        {"logits": keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(f)), "features": f},
    )
    net.save(tmp_path / "gray.keras")
    assert (
        train_run(tiny_shards, tmp_path / "m", "distill", f"--teacher={tmp_path / 'gray.keras'}")
        == 2
    )
    assert "3 channels" in _err(capsys) and not (tmp_path / "m").exists()


def test_factor_below_the_net_minimum(tiny_shards, tmp_path, capsys):
    # 32 px / 8 = 4 px, but the small-stem net downsamples by 8
    assert train_run(tiny_shards, tmp_path / "m", "baseline", "--factor=8") == 2
    err = _err(capsys)
    assert "4 px" in err and "at least 8 px" in err and not (tmp_path / "m").exists()


def test_no_val_split_needs_the_explicit_flag(tiny_shards, tmp_path, capsys):
    data = copy_data(tiny_shards, tmp_path / "data")
    for f in os.listdir(data):
        if f.startswith("val-"):
            os.remove(os.path.join(data, f))
    assert train_run(data, tmp_path / "m", "teacher") == 2
    assert "--allow_no_val" in _err(capsys) and not (tmp_path / "m").exists()
    assert train_run(data, tmp_path / "m", "teacher", "--allow_no_val", "--epochs=1") == 0
    assert (tmp_path / "m" / "model.keras").exists()


def test_read_only_model_dir(tiny_shards, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write read-only folders (root)")
        assert train_run(tiny_shards, ro / "m", "teacher") == 2
        assert "not writable" in _err(capsys)
    finally:
        os.chmod(ro, 0o755)


def test_finished_run_is_not_overwritten(runs, capsys):
    data = json.load(open(runs / "teacher" / "config.json"))["data"]["data_dir"]
    before = os.path.getmtime(runs / "teacher" / "model.keras")
    assert train_run(data, runs / "teacher", "teacher") == 2
    assert "finished run" in _err(capsys)
    assert os.path.getmtime(runs / "teacher" / "model.keras") == before


def test_smoke_flag_shrinks_the_config(tiny_shards, tmp_path):
    from kd_histo.cli import flags_common as fc

    from .cli_helpers import BINARIES

    module = BINARIES["train"]
    fc.FLAGS.unparse_flags()
    try:
        fc.FLAGS(
            [
                "prog",
                "--mode=teacher",
                f"--data_dir={tiny_shards}",
                f"--model_dir={tmp_path}",
                "--smoke",
                "--planes=32,64,128,256",
                "--epochs=30",
            ]
        )
        cfg = module.config_from_flags()
    finally:
        fc.FLAGS.unparse_flags()
    assert cfg.net.planes == (4, 8, 8, 16) and cfg.steps_per_epoch == 2 and cfg.epochs == 2
    assert cfg.data.batch_size == 4 and cfg.mode == "teacher"
