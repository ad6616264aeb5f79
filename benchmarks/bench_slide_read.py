"""python benchmarks/bench_slide_read.py --slide=SLIDE --input_px=28 [--run_dir=RUN] [--repeats=15]

  nice -n 15 env PYTHONPATH=. .venv/bin/python benchmarks/bench_slide_read.py \\
      --slide=/tmp/kd_histo_bench_slide/big_4x3.tif --input_px=28 --repeats=15

kd-histo-predict's slide reading timed in process CPU seconds as well as wall seconds, so that a
busy machine's figures still compare (issue 29): ``slide_reader.read_tiles`` over every grid tile
of a plan in predict's batches (one OpenSlide handle, its cache warmed by one pass), and, with
``--run_dir`` (a run folder, e.g. bench_slide's ``runs/x8``), predict's stream: the reader threads
feeding the compiled classifier, the plan made outside the clock. It times the code on
PYTHONPATH: run it once per tree to compare two versions. Prints the fastest of ``--repeats``
and the OpenSlide region reads a pass took; never asserts a time.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("slide", None, "A slide (e.g. bench_slide.py's big_4x3.tif).")
flags.DEFINE_integer("input_px", 28, "Model input: 224 teacher, 112 / 56 / 28 students x2/x4/x8.")
flags.DEFINE_integer("hr_px", 224, "HR tile side.")
flags.DEFINE_float("hr_mpp", 0.5, "HR µm/px.")
flags.DEFINE_integer("batch_size", 32, "--batch_size of kd-histo-predict (HR tiles a batch).")
flags.DEFINE_integer("repeats", 15, "Passes; the fastest counts.")
flags.DEFINE_string("run_dir", "", "Also time predict's stream with this run folder's net.")


def _best(fn, repeats: int) -> tuple[float, float]:
    """(CPU s, wall s) of the fastest of ``repeats`` calls, by CPU time."""
    runs = []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        runs.append((time.process_time() - c0, time.perf_counter() - w0))
    return min(runs)


def main(argv):
    del argv
    import numpy as np
    import openslide

    from kd_histo.convert import slides
    from kd_histo.evaluation import slide_predict, slide_reader

    plan = slide_reader.plan_read(
        FLAGS.slide, hr_px=FLAGS.hr_px, hr_mpp=FLAGS.hr_mpp, input_px=FLAGS.input_px, min_tissue=0
    )
    batch = slide_predict.tiles_per_batch(FLAGS.batch_size, FLAGS.hr_px, plan.input_px)
    chunks = [plan.coords[i : i + batch] for i in range(0, len(plan.coords), batch)]
    slide = slides.open_slide(FLAGS.slide)
    slide.set_cache(openslide.OpenSlideCache(64 << 20))  # as the stream's shared cache
    stats = slide_reader.StreamStats()
    list(slide_reader.stream_batches(plan, batch, num_workers=0, stats=stats))  # reads a pass

    def read():
        for c in chunks:
            slide_reader.read_tiles(slide, plan, c)

    read()  # warms the cache
    n = len(plan.coords)
    cpu, wall = _best(read, FLAGS.repeats)
    out = {
        "slide": os.path.basename(FLAGS.slide),
        "level": plan.level,
        "downsample": slide.level_downsamples[plan.level],
        "read_px": plan.read_px,
        "tiles": n,
        "batch": batch,
        "region_reads": getattr(stats, "region_reads", None),  # None: a tree without the count
        "read_cpu_ms": round(cpu * 1e3, 1),
        "read_wall_ms": round(wall * 1e3, 1),
        "read_tiles_per_cpu_s": round(n / cpu),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    slide.close()
    if FLAGS.run_dir:
        from kd_histo.evaluation import exported
        from kd_histo.evaluation.tile_classifier import slide_classifier
        from kd_histo.models import ood

        model, run = exported.load_network(FLAGS.run_dir)
        if run.input_px != plan.input_px:
            raise SystemExit(f"{FLAGS.run_dir} reads {run.input_px} px: pass --input_px to match")
        classify = slide_classifier(model, plan.input_px, ood.OODStats.load(FLAGS.run_dir))
        classify.get_concrete_function()

        def stream():
            for tiles in slide_reader.stream_batches(plan, batch, num_workers=2):
                np.asarray(classify(tiles)[0])

        cpu, wall = _best(stream, FLAGS.repeats)
        out.update(
            stream_cpu_ms=round(cpu * 1e3, 1),
            stream_wall_ms=round(wall * 1e3, 1),
            stream_tiles_per_cpu_s=round(n / cpu),
            stream_tiles_per_s=round(n / wall),
        )
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    flags.mark_flag_as_required("slide")
    app.run(main)
