"""Images/s of one distillation training step, uncached vs with cached teacher outputs.

    .venv/bin/python benchmarks/bench_step.py --factors=1,2,4,8 --batch=32 --hr_px=224

For each factor the student reads a ``hr_px / factor`` view; "uncached" runs the frozen teacher on
the ``hr_px`` view plus the resize of its feature map, "cached" feeds precomputed
``teacher_logits``/``teacher_features`` (see kd_histo.teacher_cache) so the step is the student's
forward/backward only. Both use the paper's ResNet-GN (planes 32-64-128-256), KD + maxpool+bicubic
feature loss, Adam. Each configuration is timed ``--repeats`` times over ``--steps`` steps after
warm-up; the median is reported. Prints one JSON object; never asserts a time (the machine may be
shared). Data loading is excluded (random tensors already in memory).

TF's oneDNN CPU kernels are on unless ``TF_ENABLE_ONEDNN_OPTS=0``; the kd_histo binaries and the
test session turn them off (a TF 2.16 heap corruption in small-stem conv backprop), so time both:

    TF_ENABLE_ONEDNN_OPTS=0 .venv/bin/python benchmarks/bench_step.py
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402


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

    from kd_histo import losses as L
    from kd_histo.distiller import ResolutionDistiller
    from kd_histo.models import build_model

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
    distiller.compile(keras.optimizers.Adam(1e-3))
    distiller.optimizer.build(distiller.trainable_variables)
    step = tf.function(distiller.train_step, jit_compile=jit_compile, reduce_retracing=True)
    for _ in range(warmup):
        float(step(data)["loss"])
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            out = step(data)
        float(out["loss"])  # wait for the last step
        rates.append(steps * batch / (time.perf_counter() - start))
    return {
        "factor": factor,
        "mode": mode,
        "student_px": lr_px,
        "images_per_s": round(statistics.median(rates), 1),
        "runs": [round(r, 1) for r in rates],
    }


def main(argv):
    del argv
    import tensorflow as tf

    f = flags.FLAGS
    planes = tuple(int(p) for p in f.arch_planes.split(","))
    results = []
    for fac in f.factors:
        for mode in f.modes:
            r = bench_one(
                int(fac),
                mode,
                batch=f.batch,
                hr_px=f.hr_px,
                steps=f.steps,
                warmup=f.warmup,
                repeats=f.repeats,
                jit_compile=f.jit_compile,
                planes=planes,
            )
            print(json.dumps(r), file=sys.stderr, flush=True)  # progress; survives a cut-off run
            results.append(r)
    print(
        json.dumps(
            {
                "batch": f.batch,
                "hr_px": f.hr_px,
                "jit_compile": f.jit_compile,
                "planes": planes,
                "tf": tf.__version__,
                "cpus": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
                "load_avg_1m": os.getloadavg()[0],
                "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)"),
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
