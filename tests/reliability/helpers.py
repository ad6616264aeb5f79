"""Small builders of bad inputs shared by the reliability tests (images, records, shards)."""

from __future__ import annotations

import io
import json
import os
import struct
import time
import zlib

import numpy as np
from PIL import Image
from support import REPO

from kd_histo.cli import convert as convert_cli
from kd_histo.cli import flags_common as fc
from kd_histo.data.pipeline import PipelineConfig
from kd_histo.training.config import NetConfig, RunConfig

# The tiny run of the binaries' tests as kd-histo-train flags (TINY_NET, 1 epoch of 2 steps);
# a later --epochs=N in the same argv wins.
TINY_FLAGS = [
    "--planes=4,8,8,16",
    "--stem=small",
    "--batch_size=4",
    "--epochs=1",
    "--steps_per_epoch=2",
    "--val_steps=1",
    "--profile_steps=0,0",
    "--verbose=0",
]
TINY_NET = NetConfig(planes=(4, 8, 8, 16), stem="small")
# A binary run as a child process: the checkout's kd_histo, without TF's C++ import chatter.
CHILD_ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}


def tiny_config(data_dir, model_dir, mode: str = "teacher", **kw) -> RunConfig:
    """A tiny run: the tiny net, batches of 4, 1 epoch of 2 steps and 1 val step, quiet, no
    profile or image grids; ``kw`` overrides any of these (e.g. ``epochs=3``, ``data=...``)."""
    settings = dict(
        data=PipelineConfig(str(data_dir), batch_size=4),
        net=TINY_NET,
        epochs=1,
        steps_per_epoch=2,
        val_steps=1,
        verbose=0,
        profile_steps=(0, 0),
        image_grids=False,
    )
    return RunConfig(mode=mode, model_dir=str(model_dir), **{**settings, **kw})


def rgb(seed: int, px: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (px, px, 3), dtype=np.uint8)


def encoded(arr: np.ndarray, fmt: str, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def write_class_tree(root, per_class: int, px: int, seed: int) -> None:
    """PNG tiles ``<root>/{a,b}/t<i>.png`` (random RGB; tile i of class c: seed + i + 1000 *
    ord(c), so no tile of one class is a copy of the other's: convert refuses those)."""
    for c in ("a", "b"):
        for i in range(per_class):
            seeded = rgb(seed + i + 1000 * ord(c), px)
            write(os.path.join(root, c, f"t{i}.png"), encoded(seeded, "PNG"))


def convert_class_tree(capsys, src, out, *argv) -> tuple[int, str]:
    """kd-histo-convert in-process on a class tree of 16 px tiles (:func:`write_class_tree`), no
    workers, no progress bar, splits 0.5/0.25/0.25; ``argv``: more flags. Returns (exit code,
    stderr stripped)."""
    code = fc.invoke(
        convert_cli.PROG,
        convert_cli.main,
        [
            f"--input_dir={src}",
            f"--out_dir={out}",
            "--tile_px=16",
            "--num_workers=0",
            "--progress=false",
            "--split_fractions=0.5,0.25,0.25",
            *argv,
        ],
    )
    return code, capsys.readouterr().err.strip()


def write(path, data: bytes) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def giant_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` RGB pixels, with a few bytes of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def giant_jpeg(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) declares ``width`` x ``height``."""
    data = bytearray(encoded(rgb(0, 8), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def giant_tiff(width: int, height: int) -> bytes:
    """A small uncompressed TIFF whose ImageWidth/ImageLength tags declare ``width``x``height``."""
    data = bytearray(encoded(rgb(0, 8), "TIFF"))
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack("<I", data[4:8])[0]
    (n,) = struct.unpack("<H", data[ifd : ifd + 2])
    for i in range(n):
        at = ifd + 2 + 12 * i
        tag = struct.unpack("<H", data[at : at + 2])[0]
        if tag in (256, 257):  # ImageWidth, ImageLength: rewrite as one LONG
            value = width if tag == 256 else height
            data[at + 2 : at + 12] = struct.pack("<HII", 4, 1, value)
    return bytes(data)


def last_error_line(err: str, prog: str) -> str:
    """The one error line of a binary's stderr, last; the lines before it are the binary's own
    notes (each prefixed ``prog: ``), never a traceback."""
    lines = err.strip().splitlines()
    assert lines and all(line.startswith(f"{prog}: ") for line in lines), err[-3000:]
    errors = [line for line in lines if line.startswith(f"{prog}: error:")]
    assert errors == [lines[-1]], err[-3000:]
    return lines[-1]


def wait_for_report(path, key, proc, timeout=120) -> dict:
    """The JSON report a child process writes at ``path`` (train_child.py), once it holds
    ``key``; fails with the child's stderr when the child ends first, or after ``timeout`` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
            if key in state:
                return state
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the child ended (rc {proc.returncode}) first:\n{err[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no {key!r} in {path} after {timeout}s")
