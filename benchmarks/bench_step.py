"""Images/s of a distillation training step and of inference, optionally side by side with PyTorch.

    .venv/bin/python benchmarks/bench_step.py --factors=1,2,4,8 --batch=32 --hr_px=224
    .venv/bin/python benchmarks/bench_step.py --compare_torch \
        --torch_python=/tmp/torchvenv/bin/python

For each factor the student reads a ``hr_px / factor`` view; "uncached" runs the frozen teacher on
the ``hr_px`` view plus the resize of its feature map, "cached" feeds precomputed
``teacher_logits``/``teacher_features`` (see kd_histo.training.teacher_cache) so the step is the
student's
forward/backward only. Both use the paper's ResNet-GN (planes 32-64-128-256), KD + maxpool+bicubic
feature loss, Adam. "infer" times the net's forward pass (``model(x, training=False)`` in a
``tf.function``, as kd-histo-cost does) at each ``--infer_px``. Each configuration is timed
``--repeats`` times over ``--steps`` steps after warm-up; the median is reported. Data loading is
excluded (random tensors already in memory). Never asserts a time (the machine may be shared).

TensorFlow's kernels are the binaries' (oneDNN on unless ``TF_ENABLE_ONEDNN_OPTS=0`` is set;
kd_histo.cli.flags_common). ``--compare_torch`` also runs ``benchmarks/torch_step.py`` (the same
step and net in plain PyTorch) under ``--torch_python``, an interpreter with torch installed (an
optional benchmark dependency, kept out of the project's environment), one factor at a time right
after kd_histo's, so both see the same machine load; it prints a markdown table of images/s and
the ratio kd_histo / PyTorch per factor and input size, then the JSON of every timing.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags  # noqa: E402

# The binaries' TensorFlow environment (oneDNN, log level), set before TensorFlow loads.
import kd_histo.cli.flags_common  # noqa: E402,F401

TORCH_STEP = pathlib.Path(__file__).resolve().parent / "torch_step.py"
CLOCK = time.perf_counter  # --clock=process: time.process_time


def define_flags():
    flags.DEFINE_list("factors", ["1", "2", "4", "8"], "resolution factors of the student view")
    flags.DEFINE_integer("batch", 32, "batch size")
    flags.DEFINE_integer("hr_px", 224, "teacher input size")
    flags.DEFINE_integer("steps", 5, "timed steps per repeat")
    flags.DEFINE_integer("warmup", 2, "untimed steps (tracing, compilation)")
    flags.DEFINE_integer("repeats", 3, "timed repeats; the median is reported")
    flags.DEFINE_list("modes", ["uncached", "cached"], "which steps to time")
    flags.DEFINE_bool(
        "jit_compile", False, "XLA-compile the step (works: bicubic is a matmul; slower on CPU)"
    )
    flags.DEFINE_string("arch_planes", "32,64,128,256", "planes of the paper's ResNet-GN")
    flags.DEFINE_list("infer_px", ["224", "112", "56", "28"], "input sizes to time inference at")
    flags.DEFINE_bool("compare_torch", False, "also time benchmarks/torch_step.py (PyTorch)")
    flags.DEFINE_string(
        "torch_python", sys.executable, "interpreter with torch installed, for --compare_torch"
    )
    flags.DEFINE_integer(
        "threads", 0, "intra-op threads of TensorFlow and PyTorch (0: TF's default, one per core)"
    )
    flags.DEFINE_enum(
        "clock",
        "wall",
        ["wall", "process"],
        "wall: images per wall-clock second; process: per second of the process's CPU time "
        "(with --threads=1, a measure of work that a busy machine disturbs less)",
    )
    flags.DEFINE_bool(
        "predict_batch",
        True,
        "inference also at the batch kd-histo-predict runs that input size with "
        "(kd_histo.evaluation.slide_predict.tiles_per_batch of --batch), in every framework",
    )
    flags.DEFINE_bool(
        "tflite",
        False,
        "inference also through the net exported as kd-histo-export writes it (TFLite, float32, "
        "fixed batch; XNNPACK), as kd-histo-predict --model=<export> runs it",
    )
    flags.DEFINE_list(
        "torch_layouts",
        ["nchw", "channels_last"],
        "PyTorch memory layouts to time: nchw (its default), channels_last (NHWC, as TF's)",
    )


def bench_one(
    factor: int,
    mode: str,
    *,
    batch: int,
    hr_px: int,
    steps: int,
    warmup: int,
    repeats: int,
    jit_compile: bool,
    planes: tuple[int, ...],
) -> dict:
    """Times ``repeats`` x ``steps`` train steps of one configuration; returns a result dict."""
    import keras
    import numpy as np
    import tensorflow as tf

    from kd_histo.models import build_model
    from kd_histo.training import losses as L
    from kd_histo.training.distiller import ResolutionDistiller
    from kd_histo.training.optimizers import FusedAdam

    keras.utils.set_random_seed(0)
    opts = dict(mean=[0.7, 0.5, 0.7], std=[0.15, 0.2, 0.15], planes=planes)
    teacher = build_model("resnet_gn", 3, name="teacher", **opts)
    student = build_model("resnet_gn", 3, name="student", **opts)
    lr_px = hr_px // factor
    rng = np.random.default_rng(0)
    data = {
        "hr": tf.constant(rng.random((batch, hr_px, hr_px, 3), dtype=np.float32)),
        "lr": tf.constant(rng.random((batch, lr_px, lr_px, 3), dtype=np.float32)),
        "label": tf.constant(np.full(batch, -1, np.int32)),
    }
    if mode == "cached":
        t = teacher(data["hr"], training=False)
        size = student(data["lr"])["features"].shape[1:3]
        data = {
            "lr": data["lr"],
            "label": data["label"],
            "teacher_logits": t["logits"],
            "teacher_features": L.resize_teacher_map(t["features"], size),
        }
        distiller = ResolutionDistiller(student, None)
    else:
        distiller = ResolutionDistiller(student, teacher)
    distiller.compile(
        FusedAdam(1e-3)
    )  # the binaries' Adam (kd_histo.training.train.make_optimizer)
    distiller.optimizer.build(distiller.trainable_variables)
    step = tf.function(distiller.train_step, jit_compile=jit_compile, reduce_retracing=True)
    for _ in range(warmup):
        float(step(data)["loss"])
    rates = []
    for _ in range(repeats):
        start = CLOCK()
        for _ in range(steps):
            out = step(data)
        float(out["loss"])  # wait for the last step
        rates.append(steps * batch / (CLOCK() - start))
    return {
        "factor": factor,
        "mode": mode,
        "student_px": lr_px,
        "batch": batch,
        "images_per_s": round(statistics.median(rates), 1),
        "runs": [round(r, 1) for r in rates],
    }


def bench_infer(
    px: int, *, batch: int, steps: int, warmup: int, repeats: int, planes: tuple[int, ...]
) -> dict:
    """Times the net's forward pass on ``batch`` images of ``px`` (as evaluation.cost does)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from kd_histo.models import build_model

    keras.utils.set_random_seed(0)
    model = build_model("resnet_gn", 3, mean=[0.7, 0.5, 0.7], std=[0.15, 0.2, 0.15], planes=planes)
    x = tf.constant(np.random.default_rng(0).random((batch, px, px, 3), dtype=np.float32))
    fn = tf.function(lambda x: model(x, training=False)["logits"], reduce_retracing=True)
    for _ in range(warmup):
        fn(x).numpy()
    rates = []
    for _ in range(repeats):
        start = CLOCK()
        for _ in range(steps):
            out = fn(x)
        out.numpy()
        rates.append(steps * batch / (CLOCK() - start))
    return {
        "px": px,
        "mode": "infer",
        "batch": batch,
        "images_per_s": round(statistics.median(rates), 1),
        "runs": [round(r, 1) for r in rates],
    }


def bench_tflite(
    px: int,
    *,
    batch: int,
    steps: int,
    warmup: int,
    repeats: int,
    planes: tuple[int, ...],
    threads: int,
    work: str,
) -> dict:
    """Times bench_infer's net (same seed) exported by kd-histo-export's library as a float32
    TFLite graph of ``batch`` uint8 tiles of ``px`` (its preprocessing and softmax included), run
    as kd-histo-predict --model runs it (``ExportedModel``: the interpreter with XNNPACK)."""
    import keras
    import numpy as np

    from kd_histo.evaluation.export import ExportConfig, export
    from kd_histo.evaluation.exported import ExportedModel
    from kd_histo.models import build_model
    from kd_histo.training import run_record

    run_dir, out = os.path.join(work, f"run_{px}"), os.path.join(work, f"tflite_{px}_{batch}")
    if not os.path.isdir(run_dir):
        keras.utils.set_random_seed(0)
        mean, std = (0.7, 0.5, 0.7), (0.15, 0.2, 0.15)
        net = build_model("resnet_gn", 3, mean=list(mean), std=list(std), planes=planes)
        os.makedirs(run_dir)
        net.save(os.path.join(run_dir, run_record.MODEL_FILE))
        record = run_record.RunRecord(
            mode="teacher", view="hr", factor=1.0, lr_method="area", hr_px=px, input_px=px,
            mpp=0.5, class_names=("a", "b", "c"), mean=mean, std=std, arch="resnet_gn",
        )  # fmt: skip
        run_record.write_run_record(run_dir, record)
    if not os.path.isdir(out):
        export(ExportConfig(model_dir=run_dir, out=out, format="tflite", batch_size=batch))
    model = ExportedModel(out, num_threads=threads)
    x = np.random.default_rng(0).integers(0, 256, (batch, px, px, 3), np.uint8)
    for _ in range(warmup):
        model.probabilities(x)
    rates = []
    for _ in range(repeats):
        start = CLOCK()
        for _ in range(steps):
            model.probabilities(x)
        rates.append(steps * batch / (CLOCK() - start))
    return {
        "px": px,
        "mode": "infer",
        "batch": batch,
        "images_per_s": round(statistics.median(rates), 1),
        "runs": [round(r, 1) for r in rates],
        "xnnpack": model.xnnpack_delegated(),
    }


def run_torch(
    f, *, factors: str = "", modes: str = "", infer_px: str = "", batch: int = 0
) -> list[dict]:
    """Runs benchmarks/torch_step.py under --torch_python per layout; returns its JSON records."""
    records = []
    for layout in f.torch_layouts:
        if layout not in ("nchw", "channels_last"):
            raise SystemExit(f"bench_step: error: --torch_layouts: unknown layout {layout!r}")
        cmd = [
            f.torch_python,
            str(TORCH_STEP),
            f"--factors={factors}",
            f"--modes={modes}",
            f"--infer_px={infer_px}",
            f"--batch={batch or f.batch}",
            f"--hr_px={f.hr_px}",
            f"--steps={f.steps}",
            f"--warmup={f.warmup}",
            f"--repeats={f.repeats}",
            f"--planes={f.arch_planes}",
            f"--threads={f.threads or os.cpu_count()}",
            f"--clock={f.clock}",
        ]
        cmd += ["--channels_last"] if layout == "channels_last" else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            raise SystemExit(f"bench_step: error: {' '.join(cmd[:2])} failed: {tail[0]}")
        records += [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return records


def markdown(
    results: list[dict], torch_results: list[dict], layouts: list[str], tflite: list[dict] = ()
) -> str:
    """Images/s of kd_histo, the exported TFLite net (inference rows, with ``tflite``) and PyTorch
    (per layout), and the ratios to PyTorch, one row per step, input and batch."""

    def key(r):
        return (r["mode"], r.get("factor", r.get("px")), r.get("batch"))

    theirs = {(*key(r), r.get("layout")): r["images_per_s"] for r in torch_results}
    lite = {key(r): r["images_per_s"] for r in tflite}
    head = ["step", "input", "batch", "kd_histo img/s"] + (["TFLite img/s"] if tflite else [])
    for lay in layouts:
        head += [f"PyTorch {lay} img/s", f"kd_histo / PyTorch {lay}"]
        head += [f"TFLite / PyTorch {lay}"] if tflite else []
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]

    def ratio(a, b):
        return f"{a / b:.2f}" if a and b else "n/a"

    for r in results:
        what = f"x{r['factor']} ({r['student_px']} px)" if "factor" in r else f"{r['px']} px"
        lt = lite.get(key(r))
        cells = [r["mode"], what, str(r.get("batch", "")), str(r["images_per_s"])]
        cells += [str(lt or "n/a")] if tflite else []
        for lay in layouts:
            t = theirs.get((*key(r), lay))
            cells += [str(t or "n/a"), ratio(r["images_per_s"], t)]
            cells += [ratio(lt, t)] if tflite else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    global CLOCK
    import tensorflow as tf

    f = flags.FLAGS
    if f.threads:
        tf.config.threading.set_intra_op_parallelism_threads(f.threads)
        tf.config.threading.set_inter_op_parallelism_threads(f.threads)
    CLOCK = time.process_time if f.clock == "process" else time.perf_counter
    planes = tuple(int(p) for p in f.arch_planes.split(","))
    results, torch_results = [], []

    def done(r, theirs=()):
        for rec in (r, *theirs):  # progress on stderr; survives a cut-off run
            print(json.dumps(rec), file=sys.stderr, flush=True)
        results.append(r)
        torch_results.extend(theirs)

    timing = dict(batch=f.batch, steps=f.steps, warmup=f.warmup, repeats=f.repeats, planes=planes)
    for fac in f.factors:
        ours = [
            bench_one(int(fac), mode, hr_px=f.hr_px, jit_compile=f.jit_compile, **timing)
            for mode in f.modes
        ]
        theirs = run_torch(f, factors=fac, modes=",".join(f.modes)) if f.compare_torch else []
        for i, r in enumerate(ours):
            done(r, theirs if i == len(ours) - 1 else ())
    lite = []
    work = tempfile.mkdtemp(prefix="bench_step_tflite-") if f.tflite else ""
    for px in f.infer_px:
        batches = [f.batch]
        if f.predict_batch:  # kd-histo-predict's batch of this input size (students: larger)
            from kd_histo.evaluation.slide_predict import tiles_per_batch

            batches += [tiles_per_batch(f.batch, f.hr_px, int(px))]
        for b in dict.fromkeys(batches):
            r = bench_infer(int(px), **{**timing, "batch": b})
            if f.tflite:
                threads = f.threads or os.cpu_count()
                lite.append(
                    bench_tflite(int(px), **{**timing, "batch": b}, threads=threads, work=work)
                )
                print(json.dumps({"tflite": lite[-1]}), file=sys.stderr, flush=True)
            done(r, run_torch(f, infer_px=px, batch=b) if f.compare_torch else ())
    if work:
        shutil.rmtree(work, ignore_errors=True)
    if f.compare_torch or f.tflite:
        print(markdown(results, torch_results, f.torch_layouts if f.compare_torch else [], lite))
    print(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                "batch": f.batch,
                "hr_px": f.hr_px,
                "jit_compile": f.jit_compile,
                "planes": planes,
                "tf": tf.__version__,
                "cpus": os.cpu_count(),
                "threads": f.threads or "default",
                "clock": f.clock,
                "machine": platform.processor() or platform.machine(),
                "load_avg_1m": os.getloadavg()[0],
                "TF_ENABLE_ONEDNN_OPTS": os.environ["TF_ENABLE_ONEDNN_OPTS"],
                # PyTorch's OpenMP threads spin while they wait: on a busy machine that costs it
                # a lot; OMP_WAIT_POLICY=PASSIVE (read by torch only) makes them sleep instead.
                "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "default"),
                "results": results,
                "torch_results": torch_results,
                "tflite_results": lite,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
