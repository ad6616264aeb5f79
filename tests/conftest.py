"""Shared fixtures: tiny TFRecord shards of synthetic H&E-like tiles, made in the test session.

``tiny_shards`` is a folder laid out exactly as kd-histo-convert writes it (``train``/``val``/
``test``/``unlabeled`` shards + ``dataset.json``), small enough for every test to use.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The kernels the binaries run (kd_histo/cli/flags_common.py): oneDNN on unless set otherwise.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_tiny_shards(out_dir, tile_px=32, per_class=4, num_shards=2, seed=0, unlabeled=8):
    """Writes a tiny data set with the project's schema; returns ``out_dir``.

    Splits: train (``per_class`` per class), val and test (half as many), unlabeled (``unlabeled``
    tiles with label -1). Slides are disjoint across splits.
    """
    import tensorflow as tf

    from kd_histo import schema
    from kd_histo.data import synthetic
    os.makedirs(out_dir, exist_ok=True)
    n_classes = len(synthetic.CLASS_NAMES)
    plan = {"train": per_class, "val": max(1, per_class // 2), "test": max(1, per_class // 2)}
    counts, shards = {}, {}
    train_pixels = []
    for s_idx, (split, n) in enumerate(plan.items()):
        images, labels, _ = synthetic.generate(n, tile_px, seed=seed + 101 * s_idx, slides_per_class=2)
        if split == "train":
            train_pixels.append(images.reshape(-1, 3) / 255.0)
        _write_split(tf, schema, out_dir, split, images, labels, [f"{split}-slide{i % 3}" for i in range(len(labels))], num_shards)
        counts[split] = {synthetic.CLASS_NAMES[c]: int((labels == c).sum()) for c in range(n_classes)}
        shards[split] = num_shards
    if unlabeled:
        images, _, _ = synthetic.generate(max(1, unlabeled // n_classes), tile_px, seed=seed + 999, slides_per_class=2)
        images = images[:unlabeled]
        labels = np.full(len(images), schema.UNLABELED)
        _write_split(tf, schema, out_dir, "unlabeled", images, labels, [f"unl-slide{i % 2}" for i in range(len(labels))], 1)
        counts["unlabeled"] = {"unlabeled": len(images)}
        shards["unlabeled"] = 1
    px = np.concatenate(train_pixels)
    info = schema.DatasetInfo(
        class_names=list(synthetic.CLASS_NAMES), tile_px=tile_px, mpp=0.5, counts=counts, shards=shards,
        mean=px.mean(0).round(6).tolist(), std=px.std(0).round(6).tolist(), source="tests/conftest.py (synthetic)",
        command="write_tiny_shards",
    )
    info.write(str(out_dir))
    return str(out_dir)


def _write_split(tf, schema, out_dir, split, images, labels, slide_ids, num_shards):
    num_shards = min(num_shards, len(images))
    for k in range(num_shards):
        path = os.path.join(str(out_dir), schema.shard_name(split, k, num_shards))
        with tf.io.TFRecordWriter(path) as w:
            for i in range(k, len(images), num_shards):
                png = tf.io.encode_png(images[i]).numpy()
                ex = schema.make_example(png, images[i].shape[0], images[i].shape[1], label=int(labels[i]),
                                         slide_id=slide_ids[i], patient_id=slide_ids[i], x=i, y=0, mpp=0.5,
                                         source=f"synthetic:{split}:{i}")
                w.write(ex.SerializeToString())


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """A read-only tiny data set folder (32 px tiles, 4 classes). Copy it before modifying."""
    return write_tiny_shards(tmp_path_factory.mktemp("tiny_shards"))


@pytest.fixture
def tiny_shards_without(tiny_shards, tmp_path):
    """``tiny_shards_without("val")``: a copy of ``tiny_shards`` without that split (shards and
    its dataset.json entries), for the cases where a split is missing."""
    import json
    import shutil

    def make(split: str) -> str:
        data = tmp_path / f"without_{split}"
        shutil.copytree(tiny_shards, data)
        for p in data.glob(f"{split}-*"):
            p.unlink()
        info = json.loads((data / "dataset.json").read_text())
        del info["counts"][split], info["shards"][split]
        (data / "dataset.json").write_text(json.dumps(info))
        return str(data)

    return make


@pytest.fixture
def shared_data():
    """``../shared/data`` beside the checkout; skips the test with a reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real H&E data folder {SHARED_DATA} is absent (it sits beside the checkout in CI)")
    return SHARED_DATA


def pytest_terminal_summary(terminalreporter):
    """One count line for the reliability cases (``make test-reliability``), beside pytest's own.

    Here, not in tests/reliability/: under xdist only this conftest is loaded in the controller.
    """
    outcomes = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            if "reliability" in getattr(report, "keywords", {}) and (report.when == "call" or outcome != "passed"):
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
    if outcomes:
        ran = sum(outcomes.values())
        detail = ", ".join(f"{n} {k}" for k, n in outcomes.items())
        terminalreporter.write_line(f"reliability cases: {ran} ({detail})")
