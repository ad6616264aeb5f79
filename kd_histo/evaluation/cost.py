"""Compute cost of a network at its input size: FLOPs from the TF graph, params, latency, memory.

FLOPs per image are counted by the TensorFlow profiler (``tf.compat.v1.profiler`` with
``ProfileOptionBuilder.float_operation``) on the frozen concrete function of the network at batch
1 and the given square input size, so they are the graph's own count (a multiply-add is 2 FLOPs),
not a formula. Latency and throughput are measured wall-clock on this machine at a few batch
sizes after warm-up; peak memory is TF's allocator peak where the device reports it (GPU), else
not reported (null: a figure not measured is not written as 0). ``profile_training_steps``
writes a TensorBoard trace of a few training steps.

Not here: which runs to compare (``kd_histo.cli.cost``), evaluation metrics
(``kd_histo.evaluation.evaluate``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
from tensorflow.python.util import deprecation

from kd_histo.models import load_model
from kd_histo.settings import setting
from kd_histo.training.run_record import read_run_record


def _logits_fn(model: keras.Model):
    def fn(x):
        out = model(x, training=False)
        return out["logits"] if isinstance(out, dict) else out

    return fn


def count_flops(model: keras.Model, input_px: int) -> int:
    """FLOPs of one forward pass of one ``input_px`` x ``input_px`` RGB image, from the TF graph."""
    concrete = tf.function(_logits_fn(model)).get_concrete_function(
        tf.TensorSpec([1, input_px, input_px, 3], tf.float32)
    )
    # Freezing turns variable reads into constants so the profiler sees every op's static shape.
    graph = convert_variables_to_constants_v2(concrete).graph
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    # The v1 profiler is the only FLOPs counter TF ships; silence its own deprecation notice.
    with deprecation.silence():
        info = tf.compat.v1.profiler.profile(
            graph=graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op", options=opts
        )
    return int(info.total_float_ops)


def count_params(model: keras.Model) -> int:
    """Trainable + non-trainable parameters."""
    return int(sum(np.prod(v.shape) for v in model.weights))


def measure_latency(
    model: keras.Model,
    input_px: int,
    batch_sizes: Sequence[int] = (1, 8, 32),
    repeats: int = 5,
    warmup: int = 2,
) -> list[dict[str, float]]:
    """Median wall-clock time per batch, throughput and peak memory at each batch size.

    Peak memory is the GPU allocator's peak when a GPU runs the net. On CPU TensorFlow keeps no
    allocator statistics, and the process's resident-set high-water mark mostly reflects earlier
    work (loading, other nets), so it is not reported: ``None`` (null in cost.json, "n/a" in
    cost.md), never a 0.0 that was not measured.

    Returns:
      [{"batch_size", "latency_ms" (per batch, median), "images_per_s", "peak_memory_mb" (None on
      CPU)}].
    """
    fn = tf.function(_logits_fn(model), reduce_retracing=True)
    gpu = bool(tf.config.list_logical_devices("GPU"))
    rows = []
    for bs in batch_sizes:
        x = tf.random.uniform([bs, input_px, input_px, 3], seed=0)
        if gpu:
            tf.config.experimental.reset_memory_stats("GPU:0")
        for _ in range(warmup):
            fn(x).numpy()  # .numpy() waits for the device, so timings include the work
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x).numpy()
            times.append(time.perf_counter() - t0)
        med = float(np.median(times))
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20 if gpu else None
        rows.append(
            {
                "batch_size": int(bs),
                "latency_ms": med * 1e3,
                "images_per_s": bs / med,
                "peak_memory_mb": None if peak is None else float(peak),
            }
        )
    return rows


@dataclasses.dataclass(frozen=True)
class CostEntry:
    """The cost of one network (one row of the cost table)."""

    name: str
    input_px: int
    flops: int
    params: int
    timings: tuple[dict[str, float], ...] = ()

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def model_cost(
    name: str,
    model: keras.Model,
    input_px: int,
    batch_sizes: Sequence[int] = (1, 8, 32),
    repeats: int = 5,
) -> CostEntry:
    """FLOPs, parameters and (unless ``batch_sizes`` is empty) timings of ``model`` at its input."""
    if input_px < 1:
        raise ValueError(f"input_px must be >= 1, got {input_px}")
    timings = tuple(measure_latency(model, input_px, batch_sizes, repeats)) if batch_sizes else ()
    return CostEntry(
        name, int(input_px), count_flops(model, input_px), count_params(model), timings
    )


def cost_table(entries: Sequence[CostEntry], reference: str | None = None) -> list[dict[str, Any]]:
    """Rows with FLOPs/params ratios to the reference (the teacher; default the first entry)."""
    if not entries:
        raise ValueError("no networks to compare")
    ref = next((e for e in entries if e.name == reference), entries[0])
    rows = []
    for e in entries:
        row = {
            "name": e.name,
            "input_px": e.input_px,
            "gflops": e.gflops,
            "params": e.params,
            "flops_ratio_to_ref": ref.flops / e.flops if e.flops else float("inf"),
            "params_ratio_to_ref": ref.params / e.params if e.params else float("inf"),
            "reference": ref.name,
            "timings": list(e.timings),
        }
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The cost rows as a markdown table (latency/throughput at the largest measured batch)."""
    lines = [
        "| net | input px | GFLOPs/image | teacher/net FLOPs | params | latency ms (batch) | "
        "images/s "
        "| peak MB (GPU; n/a on CPU) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r["timings"][-1] if r["timings"] else None
        peak = "n/a" if t is None or t["peak_memory_mb"] is None else f"{t['peak_memory_mb']:.1f}"
        timing = (
            f"{t['latency_ms']:.2f} ({t['batch_size']}) | {t['images_per_s']:.1f} | {peak}"
            if t
            else "- | - | -"
        )
        lines.append(
            f"| {r['name']} | {r['input_px']} | {r['gflops']:.4f} | {r['flops_ratio_to_ref']:.2f} "
            "| "
            f"{r['params']:,} | {timing} |"
        )
    return "\n".join(lines) + "\n"


def write_cost(rows: Sequence[dict[str, Any]], out_dir: str) -> dict[str, str]:
    """Writes ``cost.json`` and ``cost.md`` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "json": os.path.join(out_dir, "cost.json"),
        "markdown": os.path.join(out_dir, "cost.md"),
    }
    with open(paths["json"], "w") as f:
        json.dump({"device": _device_name(), "rows": list(rows)}, f, indent=2)
    with open(paths["markdown"], "w") as f:
        f.write(markdown_table(rows))
    return paths


def _device_name() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    return f"GPU x{len(gpus)}" if gpus else f"CPU ({os.cpu_count()} cores)"


def profile_training_steps(
    model: keras.Model, input_px: int, log_dir: str, steps: int = 3, batch_size: int = 8
) -> str:
    """Writes a TensorBoard profile trace of ``steps`` SGD steps (cross-entropy on random data).

    The steps are real forward + backward + update passes of ``model`` at ``input_px``, enough to
    see where a training step spends its time; the data are random because only cost matters here.

    Returns:
      ``log_dir`` (open with ``tensorboard --logdir``, Profile tab).
    """
    num_classes = int(
        (model.output["logits"] if isinstance(model.output, dict) else model.output).shape[-1]
    )
    opt = keras.optimizers.SGD(1e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x = tf.random.uniform([batch_size, input_px, input_px, 3], seed=0)
    y = tf.random.uniform([batch_size], 0, num_classes, tf.int32, seed=1)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, _logits_fn(model)(x))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    step()  # trace and build the optimizer outside the profiled window
    tf.profiler.experimental.start(log_dir)
    try:
        for i in range(steps):
            with tf.profiler.experimental.Trace("train", step_num=i, _r=1):
                step().numpy()
    finally:
        tf.profiler.experimental.stop()
    return log_dir


@dataclasses.dataclass(frozen=True)
class CostConfig:
    """Cost of several trained runs, each at its own input size.

    Attributes:
      runs: run folders (run.json + model.keras); the first is the reference (the teacher).
      out_dir: where cost.json, cost.md and ``trace/`` go.
      names: row names; empty = the folder names.
      batch_sizes: batch sizes of the latency measurement (empty = FLOPs and params only).
      repeats: timed repeats per batch size.
      profile_steps: training steps traced for TensorBoard per run (0 = no trace).
    """

    runs: tuple[str, ...] = setting(
        help="Run folders; the first (the teacher) is the reference of the ratios."
    )
    # --out_dir is shared by the binaries (one default per process): unset here means ./cost.
    out_dir: str = setting(
        "cost",
        "Where cost.json, cost.md and the profile trace go (default ./cost).",
        flag_default="",
        unset_is_default=True,
    )
    names: tuple[str, ...] = setting((), "Row names (default the folder names).")
    batch_sizes: tuple[int, ...] = setting((1, 8, 32), "Batch sizes of the latency measurement.")
    repeats: int = setting(5, "Timed repeats per batch size (median reported).")
    profile_steps: int = setting(
        3, "Training steps in the TensorBoard trace; 0 = none.", flag="trace_steps"
    )

    def __post_init__(self):
        if any(b < 1 for b in self.batch_sizes):
            raise ValueError(
                f"batch sizes must be >= 1, got {','.join(map(str, self.batch_sizes))}; "
                "pass e.g. --batch_sizes=1,8,32"
            )
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}; pass --repeats=5")
        if self.profile_steps < 0:
            raise ValueError(f"profile steps must be >= 0 (0 = no trace), got {self.profile_steps}")


def cost_of_runs(cfg: CostConfig) -> dict[str, Any]:
    """Measures every run at its input size and writes the table; returns paths and rows."""
    if not cfg.runs:
        raise ValueError("no runs given; pass --runs=<teacher run>,<student run>,...")
    names = list(cfg.names) or [os.path.basename(os.path.normpath(r)) for r in cfg.runs]
    if len(names) != len(cfg.runs):
        raise ValueError(f"{len(names)} names for {len(cfg.runs)} runs; give one name per run")
    entries = []
    for name, run_dir in zip(names, cfg.runs):
        run = read_run_record(run_dir)
        model = load_model(run.model_path(run_dir), expected_num_classes=run.num_classes)
        entries.append(model_cost(name, model, run.input_px, cfg.batch_sizes, cfg.repeats))
        if cfg.profile_steps:
            profile_training_steps(
                model,
                run.input_px,
                os.path.join(cfg.out_dir, "trace", name),
                steps=cfg.profile_steps,
                batch_size=max(cfg.batch_sizes or (8,)),
            )
    rows = cost_table(entries, reference=names[0])
    return {"rows": rows, **write_cost(rows, cfg.out_dir)}
