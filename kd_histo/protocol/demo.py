"""The main job on the embedded default data: synthetic tiles -> shards -> protocol -> report.

``run_demo(out_dir)`` renders the synthetic H&E-like tiles (``kd_histo.data.synthetic``), converts
them
with the real conversion tool (``kd_histo.convert``), and runs the paper's protocol
(``kd_histo.protocol.experiment``): teacher on HR, LR baselines and label-free students at 2x, 4x
and 8x,
evaluation with bootstrap intervals, compute cost, and the report folder. Every step is skipped
when its output is already there, so a rerun finishes an interrupted demo.

The training template of every run comes from the caller (kd-histo-demo reads it from
``flags/demo/common.flags``, the flagfile the single ``kd-histo-train`` steps use too); the
synthetic data and the protocol's size live in :func:`demo_settings`. ``smoke=True`` shrinks
everything to run in well under a minute (tests).

Layout of ``out_dir`` (default ``runs/demo``, the folder the demo flagfiles point at)::

    tiles/        PNG tiles in class folders + manifest.csv (synthetic)
    data/         shards + dataset.json
    runs/s0/...   teacher, baseline_x{2,4,8}, student_x{2,4,8}
    report/       report.md, results.{csv,md,json}, plots, metrics/, tensorboard/
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

from kd_histo import schema
from kd_histo.convert import ConvertConfig, EncodeOptions, convert
from kd_histo.convert.convert import PARTS
from kd_histo.data import synthetic
from kd_histo.protocol.experiment import run_experiment
from kd_histo.protocol.plan import ExperimentConfig
from kd_histo.training.config import RunConfig

DEMO_JSON = "demo.json"
# The synthetic tiles stand for 2 µm/px (a 64 px tile = 128 µm, as the README's slide tiles):
# recorded
# in dataset.json, so the demo's runs read slides at their own resolution without --read_mpp.
DEMO_TILE_MPP = 2.0


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """The synthetic data (the protocol is ``ExperimentConfig``'s, smaller with ``smoke``)."""

    tile_px: int = 64
    tiles_per_class: int = 150
    slides_per_class: int = 20
    unlabeled_tiles: int = 400


def demo_settings(smoke: bool = False) -> DemoSettings:
    """The demo's synthetic data; ``smoke`` = tiny data."""
    if smoke:
        return DemoSettings(tile_px=32, tiles_per_class=8, slides_per_class=4, unlabeled_tiles=8)
    return DemoSettings()


def demo_config(base: RunConfig, data_dir: str, smoke: bool = False) -> RunConfig:
    """The training template of every demo run: ``base`` (``flags/demo/common.flags``) on the
    demo's data, the students of each factor sharing one teacher-output cache (flips only:
    cacheable); ``smoke`` = a tiny net, batches of 4, 2 epochs, no profile, grids or progress."""
    cfg = dataclasses.replace(
        base,
        mode="teacher",
        model_dir=os.path.join(os.path.dirname(data_dir), "runs"),
        data=dataclasses.replace(base.data, data_dir=data_dir),
        distill=dataclasses.replace(base.distill, teacher_cache="auto"),
    )
    if not smoke:
        return cfg
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, batch_size=4),
        net=dataclasses.replace(cfg.net, planes=(4, 8, 8, 16)),
        epochs=min(cfg.epochs, 2),
        profile_steps=(0, 0),
        image_grids=False,
        verbose=0,
    )


def _prepare_data(out_dir: str, s: DemoSettings, seed: int, log: Callable[[str], None]) -> str:
    """Synthetic tiles -> shards (each step skipped when done); returns the data folder."""
    record = os.path.join(out_dir, DEMO_JSON)
    wanted = {
        "tile_px": s.tile_px,
        "tiles_per_class": s.tiles_per_class,
        "slides_per_class": s.slides_per_class,
        "unlabeled_tiles": s.unlabeled_tiles,
        "seed": seed,
    }
    if os.path.isfile(record):
        with open(record) as f:
            before = json.load(f)
        if before != wanted:
            raise ValueError(
                f"{out_dir} holds a demo made with other data settings ({before}); "
                "choose a new --out_dir or delete that folder"
            )
    os.makedirs(out_dir, exist_ok=True)
    with open(record, "w") as f:
        json.dump(wanted, f, indent=2)
    tiles, data = os.path.join(out_dir, "tiles"), os.path.join(out_dir, "data")
    manifest = os.path.join(tiles, "manifest.csv")
    if not os.path.isfile(manifest):
        n = s.tiles_per_class * len(synthetic.CLASS_NAMES) + s.unlabeled_tiles
        log(f"data: rendering {n} synthetic H&E-like tiles ({s.tile_px} px) into {tiles}")
        synthetic.write_tile_folder(
            tiles,
            s.tiles_per_class,
            s.tile_px,
            seed=seed,
            slides_per_class=s.slides_per_class,
            n_unlabeled=s.unlabeled_tiles,
        )
    if os.path.isfile(os.path.join(data, schema.DATASET_JSON)) and not os.path.isdir(
        os.path.join(data, PARTS)
    ):
        log(f"data: {data} converted already, skipped")
    else:
        log(f"data: converting {manifest} -> {data} (slide-disjoint train/val/test splits)")
        convert(
            ConvertConfig(
                out_dir=data,
                manifest=manifest,
                class_names=tuple(synthetic.CLASS_NAMES),
                encode=EncodeOptions(tile_px=s.tile_px, tile_mpp=DEMO_TILE_MPP),
                seed=seed,
                examples_per_shard=256,
                progress=True,
                command="kd-histo-demo (kd_histo.protocol.demo)",
            )
        )
    return data


def run_demo(
    out_dir: str, base: RunConfig, smoke: bool = False, log: Callable[[str], None] = print
) -> dict:
    """Runs the whole main job; returns the report paths (``report`` = report.md).

    Args:
      out_dir: the demo folder (see the module docstring).
      base: the training template (``flags/demo/common.flags``); its data folder, mode and run
        folder are the demo's, its seed seeds the synthetic data too.
      smoke: tiny data, nets and epochs (tests).
      log: where progress lines go.
    """
    s = demo_settings(smoke)
    data = _prepare_data(out_dir, s, base.seed, log)
    # smoke: factor 2 only, fewer bootstrap replicates and timed repeats
    small = (
        {"factors": (2.0,), "n_boot": 50, "cost_batch_sizes": (1, 8), "cost_repeats": 2}
        if smoke
        else {}
    )
    cfg = ExperimentConfig(
        out_dir=out_dir,
        base=demo_config(base, data, smoke),
        unlabeled_fractions=(0.0, 1.0),  # the students without and with the whole unlabeled pool
        seeds=(base.seed,),
        title="kd_histo demo (synthetic H&E-like tiles)",
        **small,
    )
    return run_experiment(cfg, log)
