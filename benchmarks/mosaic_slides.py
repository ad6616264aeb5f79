"""python benchmarks/mosaic_slides.py --data_dir=<converted tiles> --out_dir=<folder>

  .venv/bin/python benchmarks/mosaic_slides.py --data_dir=shards/lc25000_112 --out_dir=/tmp/mosaics
  kd-histo-convert --slide_labels=/tmp/mosaics/labels.csv --tile_px=112 --target_mpp=0.5 \\
      --lr_factor=8 --min_tissue=0 --out_dir=shards/lc25000_112_pyramid

Labeled slides for training a student on pyramid LR tiles (``--lr_method=pyramid``) when the
labeled data are tiles, not slides: each split's tiles of each class are stitched, 16 a row, into
one pyramidal JPEG TIFF (``benchmarks/pyramid_slide.py``: libvips, box-filtered levels), listed in
``labels.csv`` with their split; converting it with ``--lr_factor`` stores each tile's own lower
level beside it. Used for the pyramid-trained student of ``bench_domain_gap.py`` (BUILD_NOTES).
"""

from __future__ import annotations

import csv
import os
import sys

import numpy as np
from absl import app, flags
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyramid_slide  # noqa: E402  (the benchmarks folder is not a package)

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Converted tiles (dataset.json).")
flags.DEFINE_string("out_dir", None, "Where the slides and labels.csv go.")
flags.DEFINE_list(
    "splits", ["train", "val", "test"], "Splits stitched (one slide per split and class)."
)
flags.DEFINE_float("mpp", 0.5, "µm/px recorded for the stitched tiles.")
flags.DEFINE_integer("jpeg_quality", 75, "JPEG quality of the levels.")


def main(argv):
    del argv
    from kd_histo import schema
    from kd_histo.data.pipeline import PipelineConfig, make_dataset

    info = schema.DatasetInfo.read(FLAGS.data_dir)
    px = info.tile_px
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    rows = []
    for split in FLAGS.splits:
        tiles, labels = [], []
        cfg = PipelineConfig(data_dir=FLAGS.data_dir, batch_size=64, factor=1.0, hr_px=px)
        for b in make_dataset(cfg, split, training=False):
            tiles.append(np.round(b["hr"].numpy() * 255).astype(np.uint8))
            labels.append(b["label"].numpy())
        tiles, labels = np.concatenate(tiles), np.concatenate(labels)
        for c, name in enumerate(info.class_names):
            t = tiles[labels == c]
            n = (len(t) // 16) * 16  # whole rows only: no blank cells become tiles
            t = (
                t[:n]
                .reshape(n // 16, 16, px, px, 3)
                .transpose(0, 2, 1, 3, 4)
                .reshape(n // 16 * px, 16 * px, 3)
            )
            png = os.path.join(FLAGS.out_dir, f"{split}_{name}.png")
            Image.fromarray(t).save(png)
            tif = pyramid_slide.pyramid_tiff(
                png,
                os.path.join(FLAGS.out_dir, f"{split}_{name}.tif"),
                mpp=FLAGS.mpp,
                quality=FLAGS.jpeg_quality,
            )
            os.remove(png)
            rows.append((tif, name, f"{split}_{name}", f"{split}_{name}", split))
            print(f"{split} {name}: {n} tiles -> {tif}", flush=True)
    with open(os.path.join(FLAGS.out_dir, "labels.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "slide_id", "patient_id", "split"])
        w.writerows(rows)


if __name__ == "__main__":
    flags.mark_flags_as_required(["data_dir", "out_dir"])
    app.run(main)
