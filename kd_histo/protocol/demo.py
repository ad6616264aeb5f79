"""The main job on the embedded default data: synthetic tiles -> shards -> protocol -> report.

``run_demo(out_dir)`` renders the synthetic H&E-like tiles (``kd_histo.data.synthetic``), converts them
with the real conversion tool (``kd_histo.convert``), and runs the paper's protocol
(``kd_histo.protocol.experiment``): teacher on HR, LR baselines and label-free students at 2x, 4x and 8x,
evaluation with bootstrap intervals, compute cost, and the report folder. Every step is skipped
when its output is already there, so a rerun finishes an interrupted demo.

The settings live in :func:`demo_settings` and :func:`base_config`; ``flags/demo/common.flags``
holds the same training settings for running single steps with ``kd-histo-train`` (a test keeps
the two equal). ``smoke=True`` shrinks everything to run in well under a minute (tests).

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
from typing import Callable

from kd_histo.data.pipeline import PipelineConfig
from kd_histo.training.config import DistillConfig, NetConfig, OptimConfig, RunConfig

DEMO_JSON = "demo.json"
# The synthetic tiles stand for 2 µm/px (a 64 px tile = 128 µm, as the README's slide tiles): recorded
# in dataset.json, so the demo's runs read slides at their own resolution without --target_mpp.
DEMO_TILE_MPP = 2.0


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """The synthetic data and the size of the protocol."""

    tile_px: int = 64
    tiles_per_class: int = 150
    slides_per_class: int = 20
    unlabeled_tiles: int = 400
    factors: tuple[float, ...] = (2.0, 4.0, 8.0)
    unlabeled_fractions: tuple[float, ...] = (0.0, 1.0)
    epochs: int = 12
    seed: int = 0
    n_boot: int = 1000


def demo_settings(smoke: bool = False) -> DemoSettings:
    """The demo's data and protocol; ``smoke`` = tiny data, factor 2 only, 2 epochs."""
    if smoke:
        return DemoSettings(
            tile_px=32,
            tiles_per_class=8,
            slides_per_class=4,
            unlabeled_tiles=8,
            factors=(2.0,),
            unlabeled_fractions=(0.0, 1.0),
            epochs=2,
            n_boot=50,
        )
    return DemoSettings()


def base_config(data_dir: str, settings: DemoSettings, smoke: bool = False) -> RunConfig:
    """The training template of every demo run (the same as ``flags/demo/common.flags``).

    A small paper-style ResNet-GN (planes 8-16-32-64, the small stride-8 stem so that the x8 view
    of a 64 px tile, 8 px, still fills the net) with the paper's optimizer: Adam, lr 1e-3,
    weight decay 1e-4, here with a cosine schedule.
    """
    planes = (4, 8, 8, 16) if smoke else (8, 16, 32, 64)
    data = PipelineConfig(
        data_dir=data_dir,
        batch_size=4 if smoke else 16,
        augment="flips",
        seed=settings.seed,
        shuffle_buffer=1024,
    )
    return RunConfig(
        mode="teacher",
        model_dir=os.path.join(os.path.dirname(data_dir), "runs"),
        data=data,
        net=NetConfig(
            arch="resnet_gn", planes=planes, kwargs=(("stem", "small"), ("norm", "group"))
        ),
        optim=OptimConfig(name="adam", learning_rate=1e-3, weight_decay=1e-4, schedule="cosine"),
        # The students of each factor share one teacher-output cache (flips only: cacheable).
        distill=DistillConfig(teacher_cache="auto"),
        epochs=settings.epochs,
        seed=settings.seed,
        profile_steps=(0, 0) if smoke else (2, 4),
        image_grids=not smoke,
        verbose=0 if smoke else 2,
    )


def _prepare_data(out_dir: str, s: DemoSettings, log: Callable[[str], None]) -> str:
    """Synthetic tiles -> shards (each step skipped when done); returns the data folder."""
    from kd_histo import schema
    from kd_histo.convert import ConvertConfig, EncodeOptions, convert
    from kd_histo.convert.convert import PARTS
    from kd_histo.data import synthetic

    record = os.path.join(out_dir, DEMO_JSON)
    wanted = {
        "tile_px": s.tile_px,
        "tiles_per_class": s.tiles_per_class,
        "slides_per_class": s.slides_per_class,
        "unlabeled_tiles": s.unlabeled_tiles,
        "seed": s.seed,
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
            seed=s.seed,
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
                seed=s.seed,
                examples_per_shard=256,
                progress=True,
                command="kd-histo-demo (kd_histo.protocol.demo)",
            )
        )
    return data


def run_demo(
    out_dir: str = "runs/demo", smoke: bool = False, log: Callable[[str], None] = print
) -> dict:
    """Runs the whole main job; returns the report paths (``report`` = report.md)."""
    from kd_histo.protocol.experiment import run_experiment
    from kd_histo.protocol.plan import ExperimentConfig

    s = demo_settings(smoke)
    data = _prepare_data(out_dir, s, log)
    cfg = ExperimentConfig(
        out_dir=out_dir,
        base=base_config(data, s, smoke),
        factors=s.factors,
        unlabeled_fractions=s.unlabeled_fractions,
        seeds=(s.seed,),
        n_boot=s.n_boot,
        cost_batch_sizes=(1, 8) if smoke else (1, 32),
        cost_repeats=2 if smoke else 5,
        title="kd_histo demo (synthetic H&E-like tiles)",
    )
    return run_experiment(cfg, log)
