"""python benchmarks/bench_convert.py --tile_dir=<class folders> --slide=<slide file>

  python benchmarks/bench_convert.py --tile_dir=../shared/data/lc25000_lung \\
      --slide=../shared/data/slides/CMU-1-Small-Region.svs

Measures conversion throughput (tiles/s, wall clock, end to end including worker start-up, the
pHash pass when asked, and the merge) for a tile folder and for a slide at each --slide_mpp, and
prints one JSON object. It never asserts a time: numbers depend on the machine and its load.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time

from absl import app, flags

from kd_histo.convert import ConvertConfig, EncodeOptions, convert

FLAGS = flags.FLAGS
flags.DEFINE_string("tile_dir", "", "Folder of class subfolders ('' = skip).")
flags.DEFINE_string("slide", "", "A whole-slide image ('' = skip).")
flags.DEFINE_list("slide_mpp", ["0.5", "1.0"], "Target µm/px values for the slide.")
flags.DEFINE_integer("tile_px", 224, "Tile side.")
flags.DEFINE_enum(
    "group_by", "phash", ["slide", "phash", "near_duplicates"], "Grouping for the tile folder."
)
flags.DEFINE_integer("num_workers", 2, "Worker processes.")
flags.DEFINE_string("work_dir", "", "Scratch folder (default: a temporary one, removed after).")


def _timed(cfg: ConvertConfig) -> dict:
    start = time.perf_counter()
    info = convert(cfg)
    seconds = time.perf_counter() - start
    n = sum(info.num_examples(s) for s in info.counts)
    return {
        "tiles": n,
        "skipped": len(info.skipped),
        "seconds": round(seconds, 2),
        "tiles_per_s": round(n / seconds, 1),
    }


def main(argv):
    del argv
    work = FLAGS.work_dir or tempfile.mkdtemp(prefix="bench_convert_")
    result = {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "num_workers": FLAGS.num_workers,
        "load_avg_1m_before": round(os.getloadavg()[0], 2),
    }
    try:
        if FLAGS.tile_dir:
            cfg = ConvertConfig(
                out_dir=os.path.join(work, "tiles"),
                input_dir=FLAGS.tile_dir,
                group_by=FLAGS.group_by,
                encode=EncodeOptions(tile_px=FLAGS.tile_px),
                num_workers=FLAGS.num_workers,
            )
            result["tile_folder"] = {
                "input": FLAGS.tile_dir,
                "group_by": FLAGS.group_by,
                **_timed(cfg),
            }
        for mpp in FLAGS.slide_mpp if FLAGS.slide else []:
            cfg = ConvertConfig(
                out_dir=os.path.join(work, f"slide_{mpp}"),
                slides=(FLAGS.slide,),
                encode=EncodeOptions(tile_px=FLAGS.tile_px, target_mpp=float(mpp)),
                num_workers=FLAGS.num_workers,
            )
            result[f"slide_{mpp}_mpp"] = {"input": FLAGS.slide, **_timed(cfg)}
    finally:
        if not FLAGS.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    result["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
