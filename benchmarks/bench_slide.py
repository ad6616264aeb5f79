"""python benchmarks/bench_slide.py [--work_dir=DIR] [--models=teacher,x2,x4,x8]

  .venv/bin/python benchmarks/bench_slide.py --slide=../shared/data/slides/CMU-1-Small-Region.svs

End-to-end whole-slide prediction, timed as a user runs it: each model is one ``kd-histo-predict``
process (interpreter and TensorFlow start-up, model load, tissue detection, reading, inference,
CSVs) on a large pyramidal slide and on a small one of the same kind; the small run's time and
tiles are subtracted, so start-up cancels and what is left is the marginal tiles/s (the fastest of
``--repeats`` runs each). Every grid tile is predicted by default (``--min_tissue=0``), as in the
issue's 4,488-tile measurement. "stream tiles/s" is predict's own summary line: reading and
inference alone, without start-up, model load and tissue detection (steadier on a busy machine,
where start-up times vary by seconds).

The slides are built here from the real CMU region (BENCHMARK-ONLY dependency: libvips'
``vips`` command, ``apt-get install -y libvips-tools``): the large one mirrors the region into a
2 x 2 block and repeats it 4 x 3 times (17,760 x 17,802 px), the small one is the region alone;
both are tiled pyramidal JPEG TIFFs at 0.5 µm/px (256 px tiles, Q75, box-filtered levels). They
are kept in ``--work_dir`` for reruns.

The nets are the paper's ResNet-GN (32-64-128-256, ImageNet stem), untrained (speed does not
depend on the weights), saved as run folders with their run records: a teacher reading 224 px at
0.5 µm/px and students x2/x4/x8 reading 112/56/28 px at 1/2/4 µm/px. Prints a markdown table and
one JSON object; never asserts a time (it depends on the machine and its load).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pyramid_slide  # noqa: E402  (the benchmarks folder is not a package)

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "slide",
    "../shared/data/slides/CMU-1-Small-Region.svs",
    "The real slide the test slides are made of.",
)
flags.DEFINE_string(
    "work_dir", "/tmp/kd_histo_bench_slide", "Slides, run folders and predictions (kept)."
)
flags.DEFINE_list("models", ["teacher", "x2", "x4", "x8"], "teacher and/or xF students to time.")
flags.DEFINE_integer("batch_size", 32, "--batch_size of kd-histo-predict.")
flags.DEFINE_integer("num_workers", 0, "--num_workers of kd-histo-predict (0 = its default).")
flags.DEFINE_list(
    "blocks", ["4", "3"], "Copies of the mirrored 2 x 2 block across, down (large slide)."
)
flags.DEFINE_float(
    "min_tissue",
    0.0,
    "--min_tissue of kd-histo-predict (0 = every grid tile, as the issue's "
    "4,488-tile measurement).",
)
flags.DEFINE_integer(
    "repeats",
    2,
    "Runs per model and slide; the fastest counts (start-up varies on a busy machine).",
)
flags.DEFINE_string(
    "cascade",
    "",
    "Also time a cascade: '<student>:<fraction>', e.g. x8:0.1 (needs "
    "kd-histo-predict --cascade_teacher).",
)

HR_PX, MPP = 224, 0.5


def make_runs(root: str, models: list[str]) -> dict[str, str]:
    """Run folders of untrained paper nets with their run records; returns name -> folder."""
    import keras

    from kd_histo.data.views import lr_size
    from kd_histo.models import build_model
    from kd_histo.training import run_record

    out = {}
    for name in models:
        factor = 1.0 if name == "teacher" else float(name.lstrip("x"))
        run_dir = os.path.join(root, name)
        out[name] = run_dir
        if os.path.isfile(os.path.join(run_dir, run_record.RUN_JSON)):
            continue
        os.makedirs(run_dir, exist_ok=True)
        keras.utils.set_random_seed(0)
        net = build_model(
            "resnet_gn",
            3,
            mean=[0.7, 0.5, 0.7],
            std=[0.15, 0.2, 0.15],
            planes=(32, 64, 128, 256),
            stem="imagenet",
        )
        net.save(os.path.join(run_dir, run_record.MODEL_FILE))
        teacher = name == "teacher"
        run_record.write_run_record(
            run_dir,
            run_record.RunRecord(
                mode="teacher" if teacher else "distill",
                view="hr" if teacher else "lr",
                factor=factor,
                lr_method="area",
                hr_px=HR_PX,
                input_px=lr_size(HR_PX, factor),
                mpp=MPP,
                class_names=("a", "b", "c"),
                mean=(0.7, 0.5, 0.7),
                std=(0.15, 0.2, 0.15),
                arch="resnet_gn",
            ),
        )
    return out


def _peak_rss(pid: int) -> int:
    """Peak resident set size of a live process in bytes (Linux /proc; 0 when unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def predict_once(run_dir: str, slide: str, out_dir: str, extra: list[str]) -> dict:
    """One kd-histo-predict process, timed from outside; tiles counted in its predictions.csv."""
    cmd = [
        sys.executable,
        "-m",
        "kd_histo.cli.predict",
        f"--model_dir={run_dir}",
        f"--inputs={slide}",
        f"--out_dir={out_dir}",
        f"--batch_size={FLAGS.batch_size}",
        f"--min_tissue={FLAGS.min_tissue}",
        *extra,
    ]
    if FLAGS.num_workers:
        cmd.append(f"--num_workers={FLAGS.num_workers}")
    shutil.rmtree(out_dir, ignore_errors=True)  # a finished out_dir would be resumed: skipped
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        peak = 0
        while proc.poll() is None:  # the process's own peak resident memory (VmHWM), sampled
            peak = max(peak, _peak_rss(proc.pid))
            time.sleep(0.1)
        seconds = time.perf_counter() - start
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-2000:]}")
    with open(os.path.join(out_dir, "predictions.csv")) as f:
        tiles = sum(1 for _ in csv.DictReader(f))
    lines = [ln for ln in stdout.splitlines() if "tiles/s" in ln]
    # predict's own summary line: the stream alone (reading + inference), without start-up and
    # planning
    # its tiles/s, from the unrounded clock (tiles over the printed 0.4 s would be quantised)
    m = re.search(r": \d+ tiles in [\d.]+ s, (\d+) tiles/s", lines[-1]) if lines else None
    stream = float(m[1]) if m else None
    return {
        "seconds": round(seconds, 2),
        "tiles": tiles,
        "peak_rss_mb": round(peak / 2**20),
        "stream_tiles_per_s": round(stream, 1) if stream else None,
        "log": lines[-1] if lines else "",
    }


def fastest(run_dir: str, slide: str, out_dir: str, extra: list[str]) -> dict:
    """The fastest of --repeats runs (peak memory: the largest)."""
    runs = [predict_once(run_dir, slide, out_dir, extra) for _ in range(max(1, FLAGS.repeats))]
    best = min(runs, key=lambda r: r["seconds"])
    return {
        **best,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "stream_tiles_per_s": max((r["stream_tiles_per_s"] or 0) for r in runs) or None,
        "stream_runs": [r["stream_tiles_per_s"] for r in runs],  # every run's, for the spread
    }


def main(argv):
    del argv
    work = os.path.abspath(FLAGS.work_dir)
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    blocks = tuple(int(b) for b in FLAGS.blocks)
    big = pyramid_slide.pyramid_tiff(
        FLAGS.slide, os.path.join(work, f"big_{blocks[0]}x{blocks[1]}.tif"), mpp=MPP, blocks=blocks
    )
    small = pyramid_slide.pyramid_tiff(FLAGS.slide, os.path.join(work, "small.tif"), mpp=MPP)
    build_s = time.perf_counter() - t0
    runs = make_runs(os.path.join(work, "runs"), FLAGS.models)
    jobs = [(name, runs[name], []) for name in FLAGS.models]
    if FLAGS.cascade:
        student, fraction = FLAGS.cascade.split(":")
        teacher = make_runs(os.path.join(work, "runs"), ["teacher"])["teacher"]
        jobs.append(
            (
                f"cascade {student} + teacher on {float(fraction):.0%}",
                runs[student],
                [f"--cascade_teacher={teacher}", f"--cascade_fraction={fraction}"],
            )
        )
    rows = []
    for name, run_dir, extra in jobs:
        out = os.path.join(work, "pred", name.replace(" ", "_").replace("%", "pc"))
        s = fastest(run_dir, small, out + "_small", extra)
        b = fastest(run_dir, big, out + "_big", extra)
        dt = b["seconds"] - s["seconds"]
        marginal = (b["tiles"] - s["tiles"]) / dt if dt > 0 else -1.0  # -1: lost in start-up noise
        rows.append(
            {
                "model": name,
                "big_tiles": b["tiles"],
                "big_s": b["seconds"],
                "small_tiles": s["tiles"],
                "small_s": s["seconds"],
                "marginal_tiles_per_s": round(marginal, 1),
                # the summary line times the student's pass alone: no stream figure for a cascade
                "stream_tiles_per_s": None if extra else b["stream_tiles_per_s"],
                "stream_runs": b["stream_runs"],
                "peak_rss_mb_big": b["peak_rss_mb"],
                "peak_rss_mb_small": s["peak_rss_mb"],
                "log": b["log"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    ref = next((r for r in rows if r["model"] == "teacher"), None)

    def times(r, key):
        return f"{r[key] / ref[key]:.1f}x" if ref and r[key] and ref[key] and r[key] > 0 else "n/a"

    print(
        "\n| model | big slide: tiles | s/slide | small slide: tiles | s | marginal tiles/s | x "
        "teacher "
        "| stream tiles/s | x teacher | peak RSS big / small (MB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        marginal = (
            f"{r['marginal_tiles_per_s']:.0f}"
            if r["marginal_tiles_per_s"] > 0
            else "n/a (start-up noise)"
        )
        print(
            f"| {r['model']} | {r['big_tiles']} | {r['big_s']:.1f} | {r['small_tiles']} | "
            f"{r['small_s']:.1f} "
            f"| {marginal} | {times(r, 'marginal_tiles_per_s')} | "
            f"{r['stream_tiles_per_s'] or 'n/a'} "
            f"| {times(r, 'stream_tiles_per_s')} | {r['peak_rss_mb_big']} / "
            f"{r['peak_rss_mb_small']} |"
        )
    print(
        json.dumps(
            {
                "cpus": os.cpu_count(),
                "machine": platform.machine(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(binaries' default)"),
                "slide_build_s": round(build_s, 1),
                "total_s": round(time.perf_counter() - t0, 1),
                "big_slide": big,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
