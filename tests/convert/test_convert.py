"""End to end: round trip, counts and skips, resume after kill -9, locks, tasks + merge, the CLI."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from support import REPO, small_units_command, small_units_config

from kd_histo import schema
from kd_histo.convert import ConversionError, ConvertConfig, EncodeOptions, convert, merge, run_task
from kd_histo.convert.writer import DirLock
from kd_histo.data import synthetic

from .helpers import check_split_counts, decode, random_rgb, read_split, shard_bytes, write_image


@pytest.fixture(scope="module")
def tile_folder(tmp_path_factory):
    """The demo's input: class folders + manifest.csv (32 px, 3 per class, 4 unlabeled)."""
    root = tmp_path_factory.mktemp("tiles")
    return synthetic.write_tile_folder(str(root), 3, tile_px=32, n_unlabeled=4), str(root)


def _cfg(out, **kw):
    enc = kw.pop("encode", EncodeOptions(tile_px=32))
    return ConvertConfig(out_dir=str(out), encode=enc, **kw)


def test_png_round_trip_pixels_and_metadata(tmp_path):
    src = {}
    for c in ("a", "b"):
        for i in range(3):
            rgb = random_rgb(10 * len(src), 20)
            src[write_image(tmp_path / "in" / c / f"{c}{i}.png", rgb)] = rgb
    info = convert(
        _cfg(
            tmp_path / "out",
            input_dir=str(tmp_path / "in"),
            encode=EncodeOptions(tile_px=20, tile_mpp=0.5),
            fractions=(1, 0, 0),
        )
    )
    recs = read_split(str(tmp_path / "out"), "train")
    assert len(recs) == 6 and info.class_names == ["a", "b"] and info.mpp == 0.5
    for r in recs:
        np.testing.assert_array_equal(decode(r["image"]), src[r["source"].decode()])
        assert r["label"] == info.class_names.index(
            os.path.basename(os.path.dirname(r["source"].decode()))
        )
        assert r["slide_id"].decode() == os.path.splitext(os.path.basename(r["source"].decode()))[0]
    all_px = np.concatenate([v.reshape(-1, 3) for v in src.values()]) / 255.0
    np.testing.assert_allclose(info.mean, all_px.mean(0), atol=1e-6)
    np.testing.assert_allclose(info.std, all_px.std(0), atol=1e-6)


def test_demo_manifest_counts_match_shards(tile_folder, tmp_path):
    manifest, _ = tile_folder
    info = convert(_cfg(tmp_path, manifest=manifest, num_shards=2))
    on_disk = schema.DatasetInfo.read(str(tmp_path))
    assert on_disk.to_dict() == info.to_dict()
    total = check_split_counts(str(tmp_path), info)
    for split in info.counts:
        assert len(schema.shard_paths(str(tmp_path), split)) == info.shards[split]
    assert total == 16 and info.counts["unlabeled"] == {"unlabeled": 4}
    slides_of = {s: {r["slide_id"] for r in read_split(str(tmp_path), s)} for s in info.counts}
    for a in slides_of:
        for b in slides_of:
            assert a == b or not slides_of[a] & slides_of[b]


@pytest.mark.reliability
def test_bad_files_are_skipped_and_reported_or_fatal_with_strict(tmp_path):
    write_image(tmp_path / "in" / "a" / "ok.png", random_rgb(0))
    (tmp_path / "in" / "a" / "zero.png").write_bytes(b"")
    (tmp_path / "in" / "a" / "junk.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "in" / "a" / "x.doc").write_bytes(b"doc")
    info = convert(
        _cfg(
            tmp_path / "out",
            input_dir=str(tmp_path / "in"),
            encode=EncodeOptions(tile_px=16),
            allow_one_class=True,  # one class folder: what is tested is the skipping
        )
    )
    reasons = {os.path.basename(s["path"]): s["reason"] for s in info.skipped}
    assert set(reasons) == {"zero.png", "junk.jpg", "x.doc"} and "zero-byte" in reasons["zero.png"]
    assert sum(info.num_examples(s) for s in info.counts) == 4 - len(info.skipped)
    assert "4 inputs listed (files, slides, HDF5 patches), 3 skipped" in info.notes
    with pytest.raises(ConversionError, match="zero.png: zero-byte file .--strict"):
        convert(
            _cfg(
                tmp_path / "strict",
                input_dir=str(tmp_path / "in"),
                encode=EncodeOptions(tile_px=16, strict=True),
                allow_one_class=True,
            )
        )


def test_one_line_errors_for_bad_setups(tile_folder, tmp_path):
    manifest, root = tile_folder
    with pytest.raises(ConversionError, match="--tile_px<=32"):
        convert(_cfg(tmp_path / "a", manifest=manifest, encode=EncodeOptions(tile_px=64)))
    with pytest.raises(ConversionError, match="not in --class_names"):
        convert(_cfg(tmp_path / "b", manifest=manifest, class_names=("tumour",)))
    with pytest.raises(ConversionError, match="not found"):
        convert(_cfg(tmp_path / "c", input_dir=str(tmp_path / "missing")))
    convert(_cfg(tmp_path / "d", input_dir=root))
    with pytest.raises(ConversionError, match="already holds a data set"):
        convert(_cfg(tmp_path / "d", input_dir=root))
    convert(_cfg(tmp_path / "d", input_dir=root, overwrite=True))


@pytest.mark.reliability
def test_lock_refuses_a_second_live_writer_and_takes_over_a_dead_ones(tmp_path):
    with DirLock(str(tmp_path), "task-00000"):
        with pytest.raises(ConversionError, match="is writing"):
            with DirLock(str(tmp_path), "task-00000"):
                pass
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (tmp_path / ".lock-task-00000").write_text(
        json.dumps({"pid": dead.pid, "host": socket.gethostname()})
    )
    with DirLock(str(tmp_path), "task-00000"):
        pass
    assert not (tmp_path / ".lock-task-00000").exists()


def test_lock_refusal_names_the_owner_written_just_after_the_lock_was_created(tmp_path):
    """The race of a second writer that finds the lock between its creation and its record."""
    import socket
    import threading

    lock = tmp_path / ".lock-task-00000"
    lock.write_text("")  # created (O_EXCL), owner not written yet
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
    writer = threading.Timer(0.2, lambda: lock.write_text(json.dumps(owner)))
    writer.start()
    try:
        with pytest.raises(ConversionError) as err:
            with DirLock(str(tmp_path), "task-00000"):
                pass
    finally:
        writer.join()
    assert f"(pid {os.getpid()} on {socket.gethostname()})" in str(err.value)


def test_tasks_write_disjoint_parts_and_merge_equals_single_run(tile_folder, tmp_path):
    manifest, _ = tile_folder
    single = convert(_cfg(tmp_path / "one", manifest=manifest, num_tasks=1))
    kw = dict(manifest=manifest, num_tasks=3)
    with pytest.raises(ConversionError, match="task 0 of 3 has not finished"):
        merge(_cfg(tmp_path / "many", **kw))
    units = [set(run_task(_cfg(tmp_path / "many", task_index=t, **kw))["units"]) for t in range(3)]
    assert not (units[0] & units[1] or units[1] & units[2] or units[0] & units[2])
    many = merge(_cfg(tmp_path / "many", **kw))
    assert many.counts == single.counts and many.mean == pytest.approx(single.mean)
    for split in single.counts:
        one = sorted(r["source"] for r in read_split(str(tmp_path / "one"), split))
        assert one == sorted(r["source"] for r in read_split(str(tmp_path / "many"), split))


@pytest.mark.reliability
def test_kill_9_midway_then_rerun_gives_identical_output(tmp_path):
    src = tmp_path / "src"
    manifest = synthetic.write_tile_folder(str(src), 40, tile_px=32, slides_per_class=20)
    ref = tmp_path / "ref"
    convert(small_units_config(ref, manifest))
    out = tmp_path / "out"
    cmd = small_units_command(manifest, out)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out / ".parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("*.json")) if parts.exists() else []) < 6:
        assert proc.poll() is None, "the conversion ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(parts.glob("train-*.json")))
    assert (
        not (out / "dataset.json").exists() and done_before > 0
    )  # killed midway, lock left behind
    assert (out / ".lock-task-00000").exists()
    rc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr[-2000:]
    assert shard_bytes(str(out)) == shard_bytes(str(ref)) and len(shard_bytes(str(ref))) >= 3
    a, b = schema.DatasetInfo.read(str(out)).to_dict(), schema.DatasetInfo.read(str(ref)).to_dict()
    a.pop("command"), b.pop("command")
    assert a == b


def test_cli_prints_one_line_error_and_exits_nonzero(tmp_path):
    rc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kd_histo.cli.convert",
            f"--input_dir={tmp_path / 'nope'}",
            f"--out_dir={tmp_path / 'o'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert rc.returncode == 2
    assert rc.stderr.strip().splitlines()[-1].startswith("kd-histo-convert: error: input folder")
    assert "Traceback" not in rc.stderr
    rc = subprocess.run(
        [sys.executable, "-m", "kd_histo.cli.convert", "--tile_px=abc"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert (
        rc.returncode == 2
        and "kd-histo-convert: error:" in rc.stderr
        and "Traceback" not in rc.stderr
    )


def test_gzip_and_jpeg_options(tile_folder, tmp_path):
    manifest, _ = tile_folder
    info = convert(
        _cfg(
            tmp_path,
            manifest=manifest,
            compression="GZIP",
            encode=EncodeOptions(tile_px=32, image_format="jpeg", jpeg_quality=90),
        )
    )
    assert info.compression == "GZIP" and info.image_format == "jpeg"
    assert all(p.endswith(".tfrecord.gz") for p in schema.shard_paths(str(tmp_path), "train"))
    recs = read_split(str(tmp_path), "train", "GZIP")
    assert recs[0]["image"][:2] == b"\xff\xd8" and decode(recs[0]["image"]).shape == (32, 32, 3)


def test_worker_processes_give_the_same_shards_as_in_process(tile_folder, tmp_path):
    manifest, _ = tile_folder
    convert(_cfg(tmp_path / "inproc", manifest=manifest, unit_size=3, group_by="phash"))
    convert(
        _cfg(tmp_path / "pool", manifest=manifest, unit_size=3, group_by="phash", num_workers=2)
    )
    assert shard_bytes(str(tmp_path / "pool")) == shard_bytes(str(tmp_path / "inproc"))


def test_hdf5_patch_collection_through_tensorflow_io(tmp_path):
    h5py = pytest.importorskip("h5py", reason="h5py writes the test's HDF5 file")
    x = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    y = np.array([0, 1, 0, 1, 1, 0], np.uint8).reshape(6, 1, 1, 1)  # PatchCamelyon's label layout
    with h5py.File(tmp_path / "p_x.h5", "w") as f:
        f["x"] = x
    with h5py.File(tmp_path / "p_y.h5", "w") as f:
        f["y"] = y
    info = convert(
        _cfg(
            tmp_path / "out",
            h5_images=str(tmp_path / "p_x.h5"),
            h5_labels=str(tmp_path / "p_y.h5"),
            encode=EncodeOptions(tile_px=16),
            fractions=(1, 0, 0),
        )
    )
    assert info.class_names == ["0", "1"] and info.counts == {"train": {"0": 3, "1": 3}}
    for r in read_split(str(tmp_path / "out"), "train"):
        i = int(r["source"].decode().rsplit("#", 1)[1])
        np.testing.assert_array_equal(decode(r["image"]), x[i])
        assert r["label"] == y[i, 0, 0, 0]
    with pytest.raises(ConversionError, match="has no dataset /images"):
        convert(
            _cfg(
                tmp_path / "bad",
                h5_images=str(tmp_path / "p_x.h5"),
                encode=EncodeOptions(tile_px=16, h5_key="images"),
            )
        )


def test_flags_become_the_config(tmp_path):
    from absl import flags

    from kd_histo.cli import convert as cli

    argv = [
        "kd-histo-convert",
        f"--out_dir={tmp_path}",
        "--slides=a.svs,b.svs",
        "--target_mag=20",
        "--split_fractions=0.8,0.1,0.1",
        "--lr_factor=4",
        "--compression=GZIP",
        "--num_workers=0",
    ]
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    try:
        cfg = cli.config_from_flags()
        assert cfg.slides == ("a.svs", "b.svs") and cfg.encode.target_mpp == pytest.approx(0.5)
        assert cfg.fractions == (0.8, 0.1, 0.1) and cfg.encode.lr_factor == 4
        assert cfg.compression == "GZIP" and cfg.num_workers == 0
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["kd-histo-convert", f"--out_dir={tmp_path}", "--split_fractions=0.8,x"])
        with pytest.raises(ConversionError, match="must be numbers"):
            cli.config_from_flags()
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["kd-histo-convert", f"--out_dir={tmp_path}", "--split_fractions=0.8,0.2"])
        with pytest.raises(
            ConversionError, match=r"train,val,test\[,unlabeled\] \(3 or 4 numbers\)"
        ):
            cli.config_from_flags()
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["kd-histo-convert", f"--out_dir={tmp_path}", "--split_fractions=.3,.2,.2,.3"])
        assert cli.config_from_flags().fractions == (0.3, 0.2, 0.2, 0.3)
    finally:
        flags.FLAGS.unparse_flags()


def test_progress_shows_rate_and_eta(tile_folder, tmp_path, capsys, caplog, monkeypatch):
    """Off a terminal (pytest's capture) the progress is plain lines, never a ``\r``."""
    manifest, _ = tile_folder
    monkeypatch.delenv("KD_HISTO_PROGRESS", raising=False)
    caplog.set_level(logging.INFO, logger="kd_histo.progress")
    convert(_cfg(tmp_path, manifest=manifest, unit_size=4, progress=True))
    said = [r.getMessage() for r in caplog.records if r.name == "kd_histo.progress"]
    assert said[-1].startswith("converting: 16/16 tiles (100%), ") and " tiles/s, " in said[-1]
    assert said[-1].endswith("ETA 00:00") and "\r" not in capsys.readouterr().err
    with pytest.raises(ConversionError, match="jpeg_quality"):
        convert(
            _cfg(
                tmp_path / "q", manifest=manifest, encode=EncodeOptions(tile_px=32, jpeg_quality=0)
            )
        )


def test_fourth_split_share_holds_labeled_groups_out_without_labels(tmp_path):
    """A label-scarce set from a labeled one: the 4th share goes to 'unlabeled' with label -1."""
    manifest = synthetic.write_tile_folder(str(tmp_path / "in"), 12, tile_px=16, slides_per_class=6)
    info = convert(
        ConvertConfig(
            out_dir=str(tmp_path / "out"),
            manifest=manifest,
            encode=EncodeOptions(tile_px=16),
            fractions=(0.4, 0.1, 0.1, 0.4),
        )
    )
    held = read_split(str(tmp_path / "out"), "unlabeled")
    assert (
        info.counts["unlabeled"] == {"unlabeled": len(held)} and 12 <= len(held) <= 24
    )  # 40% of 48
    assert {r["label"] for r in held} == {schema.UNLABELED}
    slides = {split: {r["slide_id"] for r in read_split(str(tmp_path / "out"), split)}
              for split in ("train", "val", "test", "unlabeled")}  # fmt: skip
    for a in slides:
        for b in slides:
            assert a == b or not slides[a] & slides[b], (a, b)
    assert sum(info.num_examples(s) for s in slides) == 48
    assert any(f"{len(held)} labeled inputs held out as 'unlabeled'" in n for n in info.notes)
