"""README's promise for every binary: an --out_dir that is an existing file, and a corrupt shard
(16 bytes XOR-ed mid-file), end in ONE line on stderr and exit status 2 (naming the shard), and
the same command with the input fixed completes normally. With --skip_corrupt the corrupt
records are skipped and counted."""

import json
import os
import re
import shutil
import subprocess

import pytest
from support import CONVERT

from kd_histo.cli import convert as convert_cli
from kd_histo.cli import cost as cost_cli
from kd_histo.cli import demo as demo_cli
from kd_histo.cli import evaluate as evaluate_cli
from kd_histo.cli import experiment as experiment_cli
from kd_histo.cli import export as export_cli
from kd_histo.cli import flags_common as fc
from kd_histo.cli import predict as predict_cli
from kd_histo.cli import train as train_cli

from .helpers import CHILD_ENV, TINY_FLAGS, encoded, last_error_line, rgb, write, write_class_tree

pytestmark = pytest.mark.reliability

BIN = {
    "convert": convert_cli,
    "train": train_cli,
    "evaluate": evaluate_cli,
    "cost": cost_cli,
    "predict": predict_cli,
    "experiment": experiment_cli,
    "demo": demo_cli,
    "export": export_cli,
}


def _run(capsys, binary, argv) -> tuple[int, str, str]:
    module = BIN[binary]
    code = fc.invoke(module.PROG, module.main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _argv(binary, out, data, run, tiles):
    """The binary's arguments with ``out`` as its output folder."""
    return {
        "convert": [
            f"--input_dir={tiles}",
            f"--out_dir={out}",
            "--tile_px=16",
            "--num_workers=0",
            "--progress=false",
            "--split_fractions=0.5,0.25,0.25",
        ],
        "train": ["--mode=teacher", f"--data_dir={data}", f"--model_dir={out}", *TINY_FLAGS],
        "evaluate": [f"--model_dir={run}", f"--data_dir={data}", f"--out_dir={out}", "--n_boot=5"],
        "cost": [
            f"--runs={run}",
            f"--out_dir={out}",
            "--batch_sizes=1",
            "--repeats=1",
            "--trace_steps=0",
        ],
        "predict": [f"--model_dir={run}", f"--inputs={data}", f"--out_dir={out}"],
        "experiment": [
            f"--data_dir={data}",
            f"--out_dir={out}",
            "--factors=2",
            "--unlabeled_fractions=0",
            "--nobaselines",
            "--n_boot=5",
            "--cost_batch_sizes=1",
            *TINY_FLAGS,
        ],
        "demo": [f"--out_dir={out}", "--smoke"],
        "export": [f"--model_dir={run}", f"--out={out}"],
    }[binary]


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiles")
    for c in ("a", "b"):
        for i in range(4):
            write(os.path.join(root, c, f"t{i}.png"), encoded(rgb(i + 10 * ord(c)), "PNG"))
    return str(root)


def _assert_one_line(code, err, prog, *words):
    """The run ends in one error line; the lines before it (a binary that had started: the
    experiment's progress) are the binary's own messages, never a traceback."""
    assert code == 2, err[-3000:]
    line = last_error_line(err, prog)
    assert all(w in line for w in words), line
    return line


@pytest.mark.parametrize(
    "binary", ["convert", "train", "evaluate", "cost", "predict", "experiment", "demo", "export"]
)
def test_out_dir_that_is_a_file(binary, tiny_shards, teacher_run, tiles, tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder\n")
    code, _, err = _run(capsys, binary, _argv(binary, blocker, tiny_shards, teacher_run, tiles))
    _assert_one_line(code, err, BIN[binary].PROG, str(blocker))
    assert blocker.read_text() == "not a folder\n"  # nothing lost
    assert sorted(os.listdir(tmp_path)) == ["taken"]  # no .tmp or half-written files beside it
    if binary in ("demo", "experiment"):
        return  # their normal run takes minutes; the refusal is what is tested
    code, _, err = _run(
        capsys, binary, _argv(binary, tmp_path / "fine", tiny_shards, teacher_run, tiles)
    )
    assert code == 0, err[-3000:]  # the same command with a folder works


def _corrupt(tiny_shards, dst, split) -> str:
    """A copy of the data with 16 bytes XOR-ed in the middle of the split's first shard."""
    shutil.copytree(tiny_shards, dst)
    shard = sorted(p for p in os.listdir(dst) if p.startswith(f"{split}-"))[0]
    path = os.path.join(dst, shard)
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    open(path, "wb").write(bytes(data))
    return shard


@pytest.mark.parametrize(
    "binary,split",
    [
        ("train", "train"),
        pytest.param("train", "val", marks=pytest.mark.large),
        ("evaluate", "test"),
        ("predict", "test"),
        ("experiment", "train"),
    ],
)
def test_corrupt_shard_is_one_line_naming_it(
    binary, split, tiny_shards, teacher_run, tiles, tmp_path, capsys
):
    data = tmp_path / "data"
    shard = _corrupt(tiny_shards, data, split)
    argv = _argv(binary, tmp_path / "out", data, teacher_run, tiles)
    code, _, err = _run(capsys, binary, argv)
    _assert_one_line(code, err, BIN[binary].PROG, shard, "--skip_corrupt")
    if binary == "experiment":
        return
    code, out, err = _run(capsys, binary, [*argv, "--skip_corrupt"])
    assert code == 0, err[-3000:]
    said = re.findall(r"--skip_corrupt: (\d+) corrupt records skipped", out + err)
    assert said and int(said[0]) >= 1, out + err  # the damaged shard's records after the damage


# Two processes that import TensorFlow: ~20 s on 2 busy cores (make test-reliability runs it).
@pytest.mark.large
def test_convert_on_a_full_disk_is_one_line_and_leaves_no_tmp_file(tmp_path):
    """``ulimit -f`` (a file size limit: writes fail with EFBIG, as on a full disk) in a real
    process; then the same command without the limit finishes the data set."""
    src = tmp_path / "src"
    write_class_tree(src, 12, 64, seed=100)
    out = tmp_path / "out"
    argv = [
        *CONVERT,
        f"--input_dir={src}",
        f"--out_dir={out}",
        "--tile_px=64",
        "--num_workers=0",
        "--progress=false",
        "--png_level=0",
        "--num_shards=1",
    ]
    limited = ["bash", "-c", 'ulimit -f 40 && exec "$@"', "bash", *argv]  # 40 KiB per file
    proc = subprocess.run(limited, env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    _assert_one_line(proc.returncode, proc.stderr, "kd-histo-convert", "File too large")
    left = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if ".tmp" in f]
    assert not left, left
    proc = subprocess.run(argv, env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.load(open(out / "dataset.json"))
    assert sum(sum(c.values()) for c in info["counts"].values()) == 24


def test_evaluate_on_a_full_disk_is_one_line(teacher_run, tiny_shards, tmp_path, capsys):
    """The file size limit set in this process (Python ignores SIGXFSZ: writes fail with EFBIG)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    argv = [
        f"--model_dir={teacher_run}",
        f"--data_dir={tiny_shards}",
        f"--out_dir={tmp_path / 'e'}",
        "--n_boot=5",
    ]
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))
    try:
        code, _, err = _run(capsys, "evaluate", argv)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    _assert_one_line(code, err, "kd-histo-evaluate", "File too large")
    code, _, err = _run(capsys, "evaluate", argv)
    assert code == 0, err[-2000:]
