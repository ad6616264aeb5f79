"""Paired-view throughput of kd_histo.data.make_dataset (tiles/s); prints one JSON object.

    .venv/bin/python benchmarks/bench_pipeline.py --data_dir=/work/data_cache/lc25000
    .venv/bin/python benchmarks/bench_pipeline.py --make_from=../shared/data/lc25000_lung

With ``--make_from`` (a folder of class sub-folders of tiles) and no shards at ``--data_dir``, it
first writes shards there itself (tiles re-encoded as PNG with kd_histo.schema, as the converter
does) and says so in the JSON (``"shards_made_by": "bench_pipeline"``). It measures, for each
factor and augmentation preset, tiles/s over ``--batches`` batches after ``--warmup`` batches,
plus a decode-only row. A benchmark, not a test: it never asserts a time. The machine's load
average is printed beside the numbers because the machine may be shared.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags


def define_flags() -> None:
    flags.DEFINE_string(
        "data_dir", "/tmp/kd_histo_bench_shards", "converted data folder (shards + dataset.json)"
    )
    flags.DEFINE_string(
        "make_from", "", "class-folder tree of tiles to convert when data_dir has no shards"
    )
    flags.DEFINE_integer("make_per_class", 400, "tiles per class to convert with --make_from")
    flags.DEFINE_string("split", "train", "split to read")
    flags.DEFINE_integer("batch_size", 32, "batch size")
    flags.DEFINE_integer("hr_px", 224, "hr view side")
    flags.DEFINE_list("factors", ["2", "4", "8"], "resolution factors")
    flags.DEFINE_list("augments", ["none", "paper", "paper+hed"], "augmentation presets")
    flags.DEFINE_integer("batches", 20, "timed batches per configuration")
    flags.DEFINE_integer("warmup", 3, "untimed batches first (tracing, buffers)")
    flags.DEFINE_bool("cache", False, "cache decoded tiles (timed after one full pass)")


def make_shards(src: str, out_dir: str, per_class: int, num_shards: int = 4) -> str:
    """Writes a small labeled 'train' split from ``src/<class>/*`` with kd_histo.schema."""
    import numpy as np
    import tensorflow as tf

    from kd_histo import schema

    classes = sorted(c for c in os.listdir(src) if os.path.isdir(os.path.join(src, c)))
    files = [
        (os.path.join(src, c, f), k)
        for k, c in enumerate(classes)
        for f in sorted(os.listdir(os.path.join(src, c)))[:per_class]
    ]
    os.makedirs(out_dir, exist_ok=True)
    writers = [
        tf.io.TFRecordWriter(os.path.join(out_dir, schema.shard_name("train", i, num_shards)))
        for i in range(num_shards)
    ]
    tile_px, pixels = None, []
    for i, (path, label) in enumerate(files):
        img = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False).numpy()
        tile_px = tile_px or img.shape[0]
        if i % 20 == 0:
            pixels.append(img.reshape(-1, 3) / 255.0)
        ex = schema.make_example(
            tf.io.encode_png(img).numpy(),
            img.shape[0],
            img.shape[1],
            label=label,
            slide_id=os.path.basename(path),
            source=path,
        )
        writers[i % num_shards].write(ex.SerializeToString())
    for w in writers:
        w.close()
    px = np.concatenate(pixels)
    schema.DatasetInfo(
        class_names=classes,
        tile_px=int(tile_px),
        shards={"train": num_shards},
        counts={"train": {c: sum(1 for _, k in files if k == j) for j, c in enumerate(classes)}},
        mean=px.mean(0).tolist(),
        std=px.std(0).tolist(),
        source=src,
        command="benchmarks/bench_pipeline.py --make_from",
    ).write(out_dir)
    return out_dir


def tiles_per_second(cfg, split: str, batches: int, warmup: int, full_pass_first: bool) -> dict:
    """Wall-clock tiles/s and tiles per CPU-second (all threads of this process) of one config.

    Tiles per CPU-second does not depend on what else runs on a shared machine: the share of
    the cores the pipeline takes from training at a given step rate is ``rate / tiles_per_cpu_s``.
    """
    from kd_histo.data.pipeline import steps_per_epoch, training_stream

    steps = steps_per_epoch(cfg, split)
    it = iter(training_stream(cfg, split, steps=steps))  # what kd-histo-train reads
    for _ in range(steps if full_pass_first else warmup):
        next(it)
    wall, cpu = time.perf_counter(), time.process_time()
    n = 0
    for _ in range(batches):
        n += int(next(it)["hr"].shape[0])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"tiles_per_s": round(n / wall, 1), "tiles_per_cpu_s": round(n / cpu, 1)}


def main(argv) -> None:
    del argv
    import tensorflow as tf

    from kd_histo.data.pipeline import PipelineConfig

    f = flags.FLAGS
    made = False
    if not tf.io.gfile.exists(os.path.join(f.data_dir, "dataset.json")):
        if not f.make_from:
            raise app.UsageError(
                f"no dataset.json in {f.data_dir}; convert data there or pass --make_from"
            )
        make_shards(f.make_from, f.data_dir, f.make_per_class)
        made = True
    rows = []
    base = PipelineConfig(f.data_dir, batch_size=f.batch_size, hr_px=f.hr_px, cache=f.cache, seed=0)
    for factor in [float(x) for x in f.factors]:
        for preset in f.augments:
            cfg = PipelineConfig(**{**base.__dict__, "factor": factor, "augment": preset})
            rate = tiles_per_second(cfg, f.split, f.batches, f.warmup, f.cache)
            rows.append({"factor": factor, "augment": preset, **rate})
            print(json.dumps(rows[-1]), flush=True)
    print(
        json.dumps(
            {
                "data_dir": f.data_dir,
                "shards_made_by": "bench_pipeline" if made else "existing",
                "batch_size": f.batch_size,
                "hr_px": f.hr_px,
                "cache": f.cache,
                "cpus": os.cpu_count(),
                "loadavg_after": os.getloadavg(),
                "results": rows,
            },
            indent=1,
        )
    )


def run() -> None:
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
