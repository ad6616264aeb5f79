"""Plain helpers shared by tests in several folders (fixtures live in conftest.py).

Importable as ``support``: pytest puts ``tests/`` on ``sys.path`` for its conftest.py.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys

import numpy as np

CONVERT = [sys.executable, "-m", "kd_histo.cli.convert"]

# The repository root (the folder holding tests/), for every test that reads or runs its files.
REPO = pathlib.Path(__file__).resolve().parents[1]


# The conversion the crash-and-resume tests repeat, in-process and as a command (same settings):
# units of 4 tiles and 3 shards, so a kill lands between part files; PNG level 9 makes each unit
# slow enough to catch. Input: ``synthetic.write_tile_folder(..., 40, tile_px=32,
# slides_per_class=20)``.

# ``../shared/data`` beside the checkout (CI has it too): real public H&E, read in place.
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data_or_skip() -> pathlib.Path:
    """``SHARED_DATA``, or skip the calling test with a reason when the folder is absent."""
    import pytest

    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"real H&E data folder {SHARED_DATA} is absent (it sits beside the checkout in CI)"
        )
    return SHARED_DATA


def small_units_config(out, manifest, **kw):
    from kd_histo.convert import ConvertConfig, EncodeOptions

    return ConvertConfig(
        out_dir=str(out),
        manifest=manifest,
        unit_size=4,
        num_shards=3,
        encode=EncodeOptions(tile_px=32, png_level=9),
        **kw,
    )


def small_units_command(manifest, out) -> list[str]:
    return [
        *CONVERT,
        f"--manifest={manifest}",
        f"--out_dir={out}",
        "--tile_px=32",
        "--unit_size=4",
        "--num_shards=3",
        "--num_workers=0",
        "--progress=false",
        "--png_level=9",
    ]


# -- a copy of a data folder whose shards a test damages ------------------------------------------
def copy_data(data_dir, tmp_path) -> str:
    """A copy of ``data_dir`` (e.g. the read-only ``tiny_shards``) to damage; returns its path."""
    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    return str(d)


def records(path) -> list[bytes]:
    """The serialized records of one shard."""
    import tensorflow as tf

    return [r.numpy() for r in tf.data.TFRecordDataset(path)]


def rewrite(path, new_records) -> None:
    """Writes ``new_records`` as the shard at ``path``."""
    import tensorflow as tf

    with tf.io.TFRecordWriter(path) as w:
        for r in new_records:
            w.write(r)


def count_tiles(data_dir, split="val", **pipeline) -> int:
    """Tiles one evaluation pass over ``split`` yields (batches of 2; ``pipeline``: settings)."""
    from kd_histo.data.pipeline import PipelineConfig, make_dataset

    cfg = PipelineConfig(data_dir, batch_size=2, **pipeline)
    return sum(int(b["hr"].shape[0]) for b in make_dataset(cfg, split, training=False))


# -- tiny runs ----------------------------------------------------------------------------------
TINY_PLANES = (4, 8, 8, 16)  # stage widths of the tiny resnet_gn the training tests build


def tiny_run_config(data_dir, model_dir, **kw):
    """A teacher RunConfig of the tiny net (small stem): 3 epochs of 2 steps, batch 4, one val
    step, no profile, no image grids, quiet; ``kw`` replaces any field."""
    from kd_histo.data.pipeline import PipelineConfig
    from kd_histo.training.config import NetConfig, RunConfig

    base = dict(
        mode="teacher",
        model_dir=str(model_dir),
        data=PipelineConfig(data_dir, batch_size=4),
        net=NetConfig(planes=TINY_PLANES, stem="small"),
        epochs=3,
        steps_per_epoch=2,
        val_steps=1,
        verbose=0,
        profile_steps=(0, 0),
        image_grids=False,
    )
    base.update(kw)
    return RunConfig(**base)


def tiny_distill_config(data_dir, model_dir, **kw):
    """:func:`tiny_run_config` as the distillation tests run it: x2 LR views with the ``flips``
    preset (what a teacher cache holds), 1 epoch; ``kw`` replaces any field (``mode`` too)."""
    from kd_histo.data.pipeline import PipelineConfig

    data = PipelineConfig(data_dir, batch_size=4, factor=2, augment="flips")
    return tiny_run_config(data_dir, model_dir, **{"data": data, "epochs": 1, **kw})


# build_model keywords of the tiny nets built directly (add ``planes``, e.g. TINY_PLANES)
TINY_NET_KW = dict(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], stem="small")


# -- tiny data sets -----------------------------------------------------------------------------
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
        images, labels, _ = synthetic.generate(
            n, tile_px, seed=seed + 101 * s_idx, slides_per_class=2
        )
        if split == "train":
            train_pixels.append(images.reshape(-1, 3) / 255.0)
        _write_split(
            tf,
            schema,
            out_dir,
            split,
            images,
            labels,
            [f"{split}-slide{i % 3}" for i in range(len(labels))],
            num_shards,
        )
        counts[split] = {
            synthetic.CLASS_NAMES[c]: int((labels == c).sum()) for c in range(n_classes)
        }
        shards[split] = num_shards
    if unlabeled:
        images, _, _ = synthetic.generate(
            max(1, unlabeled // n_classes), tile_px, seed=seed + 999, slides_per_class=2
        )
        images = images[:unlabeled]
        labels = np.full(len(images), schema.UNLABELED)
        _write_split(
            tf,
            schema,
            out_dir,
            "unlabeled",
            images,
            labels,
            [f"unl-slide{i % 2}" for i in range(len(labels))],
            1,
        )
        counts["unlabeled"] = {"unlabeled": len(images)}
        shards["unlabeled"] = 1
    px = np.concatenate(train_pixels)
    info = schema.DatasetInfo(
        class_names=list(synthetic.CLASS_NAMES),
        tile_px=tile_px,
        mpp=0.5,
        counts=counts,
        shards=shards,
        mean=px.mean(0).round(6).tolist(),
        std=px.std(0).round(6).tolist(),
        source="tests/support.py (synthetic)",
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
                ex = schema.make_example(
                    png,
                    images[i].shape[0],
                    images[i].shape[1],
                    label=int(labels[i]),
                    slide_id=slide_ids[i],
                    patient_id=slide_ids[i],
                    x=i,
                    y=0,
                    mpp=0.5,
                    source=f"synthetic:{split}:{i}",
                )
                w.write(ex.SerializeToString())


# kd_histo.data.synthetic.CLASS_NAMES, in its order: the classes of the tests' hand-made records.
SYNTHETIC_NAMES = ("lymphocytes", "tumour", "stroma", "debris")


def run_record(**changes):
    """A hand-made ``RunRecord``: a x2 student of 32 px synthetic tiles, ``changes`` applied."""
    from kd_histo.training.run_record import RunRecord

    base = dict(
        mode="distill",
        view="lr",
        factor=2.0,
        lr_method="area",
        hr_px=32,
        input_px=16,
        mpp=0.5,
        class_names=SYNTHETIC_NAMES,
        mean=(0.6, 0.4, 0.7),
        std=(0.2, 0.25, 0.15),
    )
    return RunRecord(**{**base, **changes})
