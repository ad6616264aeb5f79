"""python benchmarks/bench_annotations.py [--side=9216] [--tile_px=64] [--repeats=3]

  PYTHONPATH=. .venv/bin/python benchmarks/bench_annotations.py

What region annotations cost a slide conversion (issue 27: at most 10% more time). A synthetic
pyramidal TIFF (H&E-like texture from ``kd_histo.data.synthetic`` repeated over ``--side`` x
``--side`` level-0 px at 0.5 µm/px, deflate-compressed 256 px tiles, 3 levels, written with
tifffile; all tissue, so every grid tile is converted) is converted with and without a QuPath
GeoJSON of ``--regions`` star-shaped regions of ``--vertices`` vertices each in two classes; the
same tiles are read and written either way (``--unannotated=unlabeled``), so the difference is the
annotations' cost: reading and checking the file, the STRtree and the tile-region overlaps. The
planning alone (``make_plan``: tissue detection, matching, labelling, splits) is timed too.
Conversions run in-process (``num_workers=0``, steadier on a shared machine); each figure is the
median of ``--repeats`` runs, alternating the two settings, after an untimed warm-up run. Prints
one JSON object; never asserts a time (it depends on the machine and its load).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import tempfile
import time

import numpy as np
from absl import app, flags

from kd_histo.convert import ConvertConfig, EncodeOptions, convert
from kd_histo.convert import plan as plan_lib

FLAGS = flags.FLAGS
flags.DEFINE_integer("side", 9216, "Level-0 side of the synthetic slide in pixels.")
flags.DEFINE_integer("tile_px", 64, "Tile side (at the slide's 0.5 µm/px: one level-0 tile).")
flags.DEFINE_integer("regions", 100, "Annotation regions.")
flags.DEFINE_integer("vertices", 1000, "Vertices per region.")
flags.DEFINE_integer("repeats", 3, "Runs per setting; the median counts.")
flags.DEFINE_string("work_dir", "", "Scratch folder (default: a temporary one, removed after).")

MPP = 0.5


def write_slide(path: str, side: int) -> None:
    """A tiled pyramidal TIFF (3 levels) that OpenSlide opens as a generic-tiff slide."""
    import tifffile
    from PIL import Image

    from kd_histo.data import synthetic

    rng = np.random.default_rng(0)
    block = np.concatenate(
        [
            np.concatenate([synthetic.render_tile(rng, (i + j) % 4, 128) for j in range(4)], 1)
            for i in range(4)
        ]
    )
    level = np.tile(block, (-(-side // 512), -(-side // 512), 1))[:side, :side]
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        for k in range(3):
            px_per_cm = 1e4 / (MPP * 2**k)
            tif.write(
                level,
                photometric="rgb",
                tile=(256, 256),
                compression="zlib",
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=1 if k else 0,
            )
            h, w = level.shape[:2]
            level = np.asarray(Image.fromarray(level).resize((w // 2, h // 2), Image.BOX))


def write_annotations(path: str, side: int, n: int, vertices: int) -> None:
    """``n`` star-shaped (simple) polygons of ``vertices`` vertices, classes A and B.

    Their bounding circles are disjoint, so no tile is dropped as ambiguous and both conversions
    write the same tiles (the comparison then times the annotations, not fewer tiles).
    """
    rng = np.random.default_rng(1)
    features, circles = [], []
    theta = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    while len(features) < n:
        radius = rng.uniform(0.01, 0.04) * side
        cx, cy = rng.uniform(radius, side - radius, 2)
        if any((cx - x) ** 2 + (cy - y) ** 2 < (radius + r) ** 2 for x, y, r in circles):
            continue
        circles.append((cx, cy, radius))
        k = len(features)
        wobble = 1 + 0.25 * np.sin(rng.integers(3, 9) * theta + rng.uniform(0, 6.3))
        wobble += 0.03 * rng.standard_normal(vertices)
        r = radius * np.clip(wobble, 0.3, 1.0)
        ring = np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], 1)
        ring = np.concatenate([ring, ring[:1]]).round(2).tolist()
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "AB"[k % 2], "color": [200, 0, 0]},
                },
            }
        )
    with open(path, "w") as f:
        json.dump({"type": "FeatureCollection", "features": features}, f)


def main(argv):
    del argv
    work = FLAGS.work_dir or tempfile.mkdtemp(prefix="kd_histo_bench_ann_")
    os.makedirs(work, exist_ok=True)
    slide = os.path.join(work, "slide.tif")
    ann = os.path.join(work, "slide.geojson")
    t0 = time.perf_counter()
    if not os.path.exists(slide):
        write_slide(slide, FLAGS.side)
    write_annotations(ann, FLAGS.side, FLAGS.regions, FLAGS.vertices)
    build_s = time.perf_counter() - t0

    def cfg(with_ann: bool) -> ConvertConfig:
        return ConvertConfig(
            out_dir=os.path.join(work, "out"),
            slides=(slide,),
            annotations=ann if with_ann else "",
            overwrite=True,
            num_workers=0,
            encode=EncodeOptions(tile_px=FLAGS.tile_px, target_mpp=MPP),
        )

    times: dict[str, list[float]] = {"plain": [], "annotated": []}
    plan_times: dict[str, list[float]] = {"plain": [], "annotated": []}
    tiles = {}
    convert(cfg(False))  # untimed warm-up: the slide in the page cache, TensorFlow loaded
    for _ in range(FLAGS.repeats):
        for name, with_ann in (("plain", False), ("annotated", True)):
            start = time.perf_counter()
            plan = plan_lib.make_plan(cfg(with_ann))
            plan_times[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            info = convert(cfg(with_ann))
            times[name].append(time.perf_counter() - start)
            tiles[name] = {s: sum(c.values()) for s, c in info.counts.items()}
            if with_ann:
                tiles["annotation_notes"] = [n for n in plan.notes if n.startswith("annotations")]
    med = {k: statistics.median(v) for k, v in times.items()}
    plan_med = {k: statistics.median(v) for k, v in plan_times.items()}
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "slide": f"{FLAGS.side}x{FLAGS.side} px at {MPP} µm/px, tile_px={FLAGS.tile_px}",
        "regions": f"{FLAGS.regions} x {FLAGS.vertices} vertices",
        "build_s": round(build_s, 1),
        "tiles": tiles,
        "convert_s": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "convert_median_s": {k: round(v, 2) for k, v in med.items()},
        "plan_median_s": {k: round(v, 3) for k, v in plan_med.items()},
        "extra_time_pct": round(100 * (med["annotated"] / med["plain"] - 1), 1),
        "extra_time_pct_fastest": round(
            100 * (min(times["annotated"]) / min(times["plain"]) - 1), 1
        ),
        "extra_plan_s": round(plan_med["annotated"] - plan_med["plain"], 3),
    }
    print(json.dumps(result, indent=1))
    if not FLAGS.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
