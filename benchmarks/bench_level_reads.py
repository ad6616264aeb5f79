"""python benchmarks/bench_level_reads.py --runs=<student run>,... --data_dir=<converted tiles>

  PYTHONPATH=. .venv/bin/python benchmarks/bench_level_reads.py \\
      --data_dir=shards/lc25000_true_112 \\
      --runs=runs/domain_shift/s0/student_x8_none,runs/domain_shift/s1/student_x8_none

What reading a level stored at a rounded size as its own pixels
(``kd_histo.evaluation.level_pixels``) does to a student's predictions, against OpenSlide's
resampled reads of the same level. A split's labelled HR tiles are stitched into a pyramidal JPEG
slide (libvips, as ``bench_domain_gap``'s mosaic: 32 tiles a row) with ``--margin`` px of glass on
the right and bottom, so the level sizes are rounded (margin 5: level 3 at 8.0117x) while every
tile stays on whole level pixels. Per run: accuracy from OpenSlide's reads, from the level's own
pixels, and from training's LR view (the HR tiles shrunk in memory), and each read's top-1
agreement with that view. With ``--margin=0`` the levels are whole and both reads are OpenSlide's.
BENCHMARK-ONLY dependency: ``vips`` (``apt-get install -y libvips-tools``).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyramid_slide  # noqa: E402  (the benchmarks folder is not a package)

FLAGS = flags.FLAGS
flags.DEFINE_list("runs", [], "Student run folders.")
flags.DEFINE_string("data_dir", None, "Converted tiles (dataset.json) whose split is stitched.")
flags.DEFINE_string("split", "test", "Split stitched into the slide.")
flags.DEFINE_integer("margin", 5, "Glass px added right and bottom (0: whole level sizes).")
flags.DEFINE_float("mpp", 0.5, "µm/px recorded for tiles whose run has none.")
flags.DEFINE_string("work_dir", "/tmp/kd_histo_level_reads", "Where the slide is written.")


def _mosaic(hr_px: int, mpp: float) -> tuple[np.ndarray, str, tuple]:
    from PIL import Image

    from kd_histo.data.pipeline import PipelineConfig, make_dataset

    tiles, labels = [], []
    cfg = PipelineConfig(data_dir=FLAGS.data_dir, batch_size=64, factor=1.0, hr_px=hr_px)
    for b in make_dataset(cfg, FLAGS.split, training=False):
        tiles.append(np.round(b["hr"].numpy() * 255).astype(np.uint8))
        labels.append(b["label"].numpy())
    tiles, labels = np.concatenate(tiles), np.concatenate(labels)
    cols, m = 32, FLAGS.margin
    rows = -(-len(tiles) // cols)
    canvas = np.full((rows * hr_px + m, cols * hr_px + m, 3), 255, np.uint8)
    coords = []
    for i, t in enumerate(tiles):
        y, x = (i // cols) * hr_px, (i % cols) * hr_px
        canvas[y : y + hr_px, x : x + hr_px] = t
        coords.append((x, y))
    os.makedirs(FLAGS.work_dir, exist_ok=True)
    png = os.path.join(FLAGS.work_dir, f"mosaic_{hr_px}_m{m}.png")
    tif = png[:-4] + ".tif"
    Image.fromarray(canvas).save(png)
    if os.path.exists(tif):
        os.remove(tif)
    return labels, pyramid_slide.pyramid_tiff(png, tif, mpp=mpp), tuple(coords)


def _row(run_dir: str) -> str:
    import tensorflow as tf

    from kd_histo.data.views import resize
    from kd_histo.evaluation import level_pixels, slide_reader
    from kd_histo.evaluation.tile_classifier import memory_lr_method
    from kd_histo.models import load_model
    from kd_histo.training.run_record import read_run_record

    run = read_run_record(run_dir)
    mpp = run.mpp or FLAGS.mpp
    labels, tif, coords = _mosaic(run.hr_px, mpp)
    net = load_model(run.model_path(run_dir), expected_num_classes=run.num_classes)
    probs = tf.function(lambda x: tf.nn.softmax(net(x, training=False)["logits"]))
    plan = slide_reader.plan_read(
        tif, hr_px=run.hr_px, hr_mpp=mpp, input_px=run.input_px, min_tissue=0.0
    )
    plan = dataclasses.replace(plan, coords=coords)

    def top1(batches) -> np.ndarray:
        return np.concatenate([probs(tf.cast(b, tf.float32) / 255.0).numpy() for b in batches])

    stats = slide_reader.StreamStats()
    own = top1(slide_reader.stream_batches(plan, 64, stats=stats)).argmax(1)
    opened = level_pixels.open_level
    level_pixels.open_level = lambda *a: None  # OpenSlide's reads, as before the level reader
    try:
        theirs = top1(slide_reader.stream_batches(plan, 64)).argmax(1)
    finally:
        level_pixels.open_level = opened
    hr = slide_reader.for_input(plan, run.hr_px)
    method = memory_lr_method(run)
    view = top1(
        resize(tf.cast(b, tf.float32) / 255.0, run.input_px, method) * 255.0  # views clip to [0, 1]
        for b in slide_reader.stream_batches(hr, 64)
    ).argmax(1)
    acc = [float((p == labels).mean()) for p in (theirs, own, view)]
    agree = [float((p == view).mean()) for p in (theirs, own)]
    return (
        f"| {run_dir} | {plan.level} | {plan.level_mpp / plan.base_mpp:.4f} | "
        f"{stats.level_pixels} | {len(labels)} | {acc[0]:.4f} | {acc[1]:.4f} | {acc[2]:.4f} | "
        f"{agree[0]:.4f} | {agree[1]:.4f} |"
    )


def main(argv):
    del argv
    print(
        f"\n`--margin={FLAGS.margin}`\n\n| run | level | downsample | own pixels read | tiles "
        "| accuracy: OpenSlide | own pixels | training view | agreement with the view: "
        "OpenSlide | own pixels |\n|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"
    )
    for run_dir in FLAGS.runs:
        print(_row(run_dir), flush=True)


if __name__ == "__main__":
    flags.mark_flag_as_required("data_dir")
    app.run(main)
