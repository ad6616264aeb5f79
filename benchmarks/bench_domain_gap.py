"""python benchmarks/bench_domain_gap.py --runs=<student run>,... [--teacher=<teacher run>]

  .venv/bin/python benchmarks/bench_domain_gap.py --runs=runs/lc/student_x4,runs/lc/student_x8 \\
      --teacher=runs/lc/teacher --slide=../shared/data/slides/CMU-1-Small-Region.svs

The domain gap of reading a student's tiles from a slide's pyramid: on the real slide, the
student's predictions from tiles read at its own µm/px from a pyramid level (what
``kd-histo-predict`` does) against its predictions from the HR tiles shrunk in memory exactly as
training made its LR views (HR tile at the run's µm/px, then the run's antialiased resize).

The real slide has one level, so its pyramid is built here as scanners build theirs (libvips:
256 px JPEG tiles, each level a box-filtered halving of the one above, ``--jpeg_quality``), from the
same level-0 pixels; the HR tiles come from the original file. Both grids are the same tiles.
BENCHMARK-ONLY dependency: ``vips`` (``apt-get install -y libvips-tools``).

Prints a markdown table and one JSON object: per run the level read, the tiles, the agreement of
the top class between the two reads, the mean absolute difference of the probabilities, and with
``--teacher`` each read's agreement with the teacher on the HR tiles.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyramid_slide  # noqa: E402  (the benchmarks folder is not a package)

FLAGS = flags.FLAGS
flags.DEFINE_list("runs", [], "Student (or baseline) run folders.")
flags.DEFINE_string("teacher", "", "Teacher run folder: also report agreement with it ('' = skip).")
flags.DEFINE_string("slide", "../shared/data/slides/CMU-1-Small-Region.svs", "The real slide.")
flags.DEFINE_string("work_dir", "/tmp/kd_histo_domain_gap", "Where the pyramid copy is kept.")
flags.DEFINE_integer("jpeg_quality", 75, "JPEG quality of the pyramid's tiles (libvips' default).")
flags.DEFINE_float("min_tissue", 0.5, "Fraction of tissue a tile needs.")
flags.DEFINE_float(
    "read_mpp", 0.0, "µm/px at which slides are read into HR tiles (0 = each run's record)."
)
flags.DEFINE_string(
    "mosaic_data",
    "",
    "Also a labeled check: a converted data folder whose --mosaic_split tiles "
    "are stitched into a pyramidal slide at the run's µm/px ('' = skip).",
)
flags.DEFINE_string("mosaic_split", "test", "Split of --mosaic_data stitched into the mosaic.")


def _probs(model_dir: str, batches) -> np.ndarray:
    import tensorflow as tf

    from kd_histo.models import load_model
    from kd_histo.training.run_record import read_run_record

    run = read_run_record(model_dir)
    net = load_model(run.model_path(model_dir), expected_num_classes=run.num_classes)
    classify = tf.function(
        lambda x: tf.nn.softmax(net(x, training=False)["logits"]), reduce_retracing=True
    )
    return np.concatenate([classify(tf.convert_to_tensor(b)).numpy() for b in batches])


def _hr_shrunk(plan, run, batch_size=64):
    """Training's LR views: HR uint8 tiles -> float [0, 1] -> the run's antialiased resize."""
    import tensorflow as tf

    from kd_histo.data.views import resize
    from kd_histo.evaluation import slide_reader

    method = "area" if run.lr_method == "pyramid" else run.lr_method
    for b in slide_reader.stream_batches(plan, batch_size):
        x = tf.convert_to_tensor(b, tf.float32) / 255.0
        yield resize(x, run.input_px, method) if run.view == "lr" else x


def _read(plan, batch_size=64):
    from kd_histo.evaluation import slide_reader

    for b in slide_reader.stream_batches(plan, batch_size):
        yield b.astype(np.float32) / 255.0


def _mosaic(data_dir: str, split: str, hr_px: int, mpp: float, work: str):
    """The split's HR tiles (uint8) and labels, and a pyramidal JPEG slide of them (32 a row)."""
    from PIL import Image

    from kd_histo.data.pipeline import PipelineConfig, make_dataset

    tiles, labels = [], []
    ds = make_dataset(
        PipelineConfig(data_dir=data_dir, batch_size=64, factor=1.0, hr_px=hr_px),
        split,
        training=False,
    )
    for b in ds:
        tiles.append(np.round(b["hr"].numpy() * 255).astype(np.uint8))
        labels.append(b["label"].numpy())
    tiles, labels = np.concatenate(tiles), np.concatenate(labels)
    cols = 32
    rows = -(-len(tiles) // cols)
    canvas = np.full((rows * hr_px, cols * hr_px, 3), 255, np.uint8)
    coords = []
    for i, t in enumerate(tiles):
        y, x = (i // cols) * hr_px, (i % cols) * hr_px
        canvas[y : y + hr_px, x : x + hr_px] = t
        coords.append((x, y))
    png = os.path.join(work, f"mosaic_{split}_{hr_px}.png")
    Image.fromarray(canvas).save(png)
    tif = os.path.join(work, f"mosaic_{split}_{hr_px}_q{FLAGS.jpeg_quality}.tif")
    if os.path.exists(tif):
        os.remove(tif)
    pyramid_slide.pyramid_tiff(png, tif, mpp=mpp, quality=FLAGS.jpeg_quality)
    return tiles, labels, tif, tuple(coords)


def _mosaic_row(model_dir: str, run, mpp: float) -> dict:
    """On stitched labeled tiles: the student's accuracy from training's LR views and from
    the pyramid."""
    import tensorflow as tf

    from kd_histo.data.views import resize
    from kd_histo.evaluation import slide_reader

    tiles, labels, tif, coords = _mosaic(
        FLAGS.mosaic_data, FLAGS.mosaic_split, run.hr_px, mpp, FLAGS.work_dir
    )
    method = "area" if run.lr_method == "pyramid" else run.lr_method
    views = (
        resize(tf.convert_to_tensor(tiles[i : i + 64], tf.float32) / 255.0, run.input_px, method)
        for i in range(0, len(tiles), 64)
    )
    from_hr = _probs(model_dir, views)
    grid = slide_reader.plan_read(
        tif,
        hr_px=run.hr_px,
        hr_mpp=mpp,
        input_px=run.input_px,
        method=run.lr_method,
        min_tissue=0.0,
    )
    plan = dataclasses.replace(grid, coords=coords)
    from_pyr = _probs(model_dir, _read(plan))
    return {
        "run": model_dir,
        "data": f"{FLAGS.mosaic_data}:{FLAGS.mosaic_split}",
        "tiles": len(tiles),
        "level": plan.level,
        "level_mpp": round(plan.level_mpp, 3),
        "remainder": round(plan.shrink, 3),
        "agreement": round(float(np.mean(from_hr.argmax(1) == from_pyr.argmax(1))), 4),
        "accuracy_hr_shrunk": round(float(np.mean(from_hr.argmax(1) == labels)), 4),
        "accuracy_pyramid": round(float(np.mean(from_pyr.argmax(1) == labels)), 4),
        "mean_abs_prob_diff": round(float(np.abs(from_hr - from_pyr).mean()), 4),
    }


def main(argv):
    del argv
    from kd_histo.evaluation import slide_reader
    from kd_histo.training.run_record import read_run_record

    if not FLAGS.runs:
        raise SystemExit("--runs is required")
    os.makedirs(FLAGS.work_dir, exist_ok=True)
    name = os.path.splitext(os.path.basename(FLAGS.slide))[0]
    pyramid = pyramid_slide.pyramid_tiff(
        FLAGS.slide,
        os.path.join(FLAGS.work_dir, f"{name}_q{FLAGS.jpeg_quality}.tif"),
        quality=FLAGS.jpeg_quality,
    )
    teacher_cache: dict = {}
    rows = []
    for model_dir in FLAGS.runs:
        run = read_run_record(model_dir)
        mpp = FLAGS.read_mpp or run.mpp
        if not mpp:
            raise SystemExit(f"{model_dir}: the run records no µm/px; pass --read_mpp")
        kw = dict(hr_px=run.hr_px, hr_mpp=mpp, method=run.lr_method, min_tissue=FLAGS.min_tissue)
        hr_plan = slide_reader.plan_read(FLAGS.slide, input_px=run.hr_px, **kw)
        pyr_plan = slide_reader.plan_read(pyramid, input_px=run.input_px, **kw)
        if (
            pyr_plan.size_l0 != hr_plan.size_l0
            or abs(pyr_plan.base_mpp / hr_plan.base_mpp - 1) > 1e-6
        ):
            raise SystemExit("the pyramid copy's grid differs from the slide's; check its µm/px")
        # the same tiles both ways (the masks of the two thumbnails may differ at the threshold)
        pyr_plan = dataclasses.replace(pyr_plan, coords=hr_plan.coords)
        from_hr = _probs(model_dir, _hr_shrunk(hr_plan, run))
        from_pyr = _probs(model_dir, _read(pyr_plan))
        pixel_gap = (
            float(
                np.mean(
                    [
                        np.abs(np.asarray(a) - b).mean()
                        for a, b in zip(_hr_shrunk(hr_plan, run), _read(pyr_plan))
                    ]
                )
            )
            * 255
        )
        row = {
            "run": model_dir,
            "factor": run.factor,
            "input_px": run.input_px,
            "input_mpp": round(pyr_plan.mpp_in, 3),
            "level": pyr_plan.level,
            "level_mpp": round(pyr_plan.level_mpp, 3),
            "remainder": round(pyr_plan.shrink, 3),
            "tiles": len(hr_plan.coords),
            "agreement": round(float(np.mean(from_hr.argmax(1) == from_pyr.argmax(1))), 4),
            "mean_abs_prob_diff": round(float(np.abs(from_hr - from_pyr).mean()), 4),
            "mean_abs_pixel_diff_of_255": round(pixel_gap, 2),
            "classes_predicted": {
                int(k): int(v) for k, v in zip(*np.unique(from_hr.argmax(1), return_counts=True))
            },
        }
        if FLAGS.teacher:
            key = (run.hr_px, mpp)
            if key not in teacher_cache:
                teacher_cache[key] = _probs(FLAGS.teacher, _read(hr_plan)).argmax(1)
            t = teacher_cache[key]
            row["teacher_agreement_hr_shrunk"] = round(float(np.mean(from_hr.argmax(1) == t)), 4)
            row["teacher_agreement_pyramid"] = round(float(np.mean(from_pyr.argmax(1) == t)), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "\n| run | input | level read | tiles | agreement pyramid vs HR-shrunk | mean abs Δp |"
        + (" vs teacher: HR-shrunk / pyramid |" if FLAGS.teacher else "")
    )
    print("|---|---|---|---:|---:|---:|" + ("---:|" if FLAGS.teacher else ""))
    for r in rows:
        line = (
            f"| {os.path.basename(os.path.normpath(r['run']))} | {r['input_px']} px at "
            f"{r['input_mpp']} µm/px "
            f"| {r['level']} ({r['level_mpp']} µm/px, then {r['remainder']}x) | {r['tiles']} "
            f"| {r['agreement']:.1%} | {r['mean_abs_prob_diff']:.4f} |"
        )
        if FLAGS.teacher:
            line += (
                f" {r['teacher_agreement_hr_shrunk']:.1%} / {r['teacher_agreement_pyramid']:.1%} |"
            )
        print(line)
    mosaic = []
    if FLAGS.mosaic_data:
        print(
            "\n| run | labeled tiles (stitched, pyramid rebuilt) | level read | agreement | "
            "accuracy: HR-shrunk "
            "/ pyramid | mean abs Δp |\n|---|---|---|---:|---:|---:|"
        )
        for model_dir in FLAGS.runs:
            run = read_run_record(model_dir)
            r = _mosaic_row(model_dir, run, FLAGS.read_mpp or run.mpp)
            mosaic.append(r)
            print(
                f"| {os.path.basename(os.path.normpath(model_dir))} | {r['tiles']} of {r['data']} "
                f"| {r['level']} "
                f"({r['level_mpp']} µm/px, then {r['remainder']}x) | {r['agreement']:.1%} | "
                f"{r['accuracy_hr_shrunk']:.1%} / {r['accuracy_pyramid']:.1%} | "
                f"{r['mean_abs_prob_diff']:.4f} |",
                flush=True,
            )
    print(
        json.dumps(
            {
                "slide": FLAGS.slide,
                "pyramid": pyramid,
                "jpeg_quality": FLAGS.jpeg_quality,
                "rows": rows,
                "mosaic": mosaic,
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
