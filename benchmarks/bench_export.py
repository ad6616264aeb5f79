"""python benchmarks/bench_export.py --model_dir=RUN [--data_dir=DATA] [--split=test]

  nice -n 10 env PYTHONPATH=. .venv/bin/python benchmarks/bench_export.py \
      --model_dir=runs/lc25000_export/student_x8 --out_dir=runs/lc25000_export/exports

The exported student against its Keras net (issue 29, Deliver 4): the run is exported with
kd-histo-export's library (SavedModel; TFLite none, float16 and int8), and every format scores the
split's tiles (default: the run's own data_dir, test split). Two inputs per format: the tiles as
read at the model's own µm/px (signature ``serving_default``; the Keras reference is the net on the
same uint8 tiles) and the HR tiles it shrinks itself (``hr``; the reference is the net on the LR
view made as training makes it, a float resize). Reported per format: top-1 agreement with the
Keras net, the largest probability difference, tiles/s of the LR input (batches
of ``--batch_size``, ``--num_threads`` threads in every runtime (default 1: steadier on a shared
machine), after one untimed warm-up pass, median of ``--repeats`` passes), and for
TFLite whether the XNNPACK delegate took the graph (a DELEGATE node in its execution plan) and the
tiles/s with TFLite's default delegates switched off (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``), which
shows what XNNPACK does. Prints one JSON object and a Markdown table; never asserts a time.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Run folder of the student (run.json + model.keras).")
flags.DEFINE_string("data_dir", "", "Converted data folder (default: the run's data_dir).")
flags.DEFINE_string("split", "test", "Split whose tiles are scored.")
flags.DEFINE_string("out_dir", "", "Where the exports go (default <model_dir>/exports).")
flags.DEFINE_integer("batch_size", 32, "Tiles per batch (TFLite's fixed batch size too).")
flags.DEFINE_integer("repeats", 3, "Timed passes per format; the median counts.")
flags.DEFINE_integer("max_tiles", 0, "At most this many tiles (0 = the whole split).")
flags.DEFINE_integer(
    "num_threads", 1, "Threads of every runtime (TF intra/inter-op, TFLite interpreters)."
)

FORMATS = (("savedmodel", "none"), ("tflite", "none"), ("tflite", "float16"), ("tflite", "int8"))


def _tiles(run, data_dir: str, split: str, max_tiles: int):
    """(HR uint8, LR view float [0, 1], LR view as uint8) of the split, evaluation's centre crop."""
    import tensorflow as tf

    from kd_histo.data.pipeline import make_dataset

    ds = make_dataset(run.pipeline_config(data_dir, 256), split, training=False)
    hr = np.concatenate([np.round(b["hr"].numpy() * 255).astype(np.uint8) for b in ds])
    if max_tiles:
        hr = hr[:max_tiles]
    from kd_histo.data.views import memory_method, resize

    x = tf.image.convert_image_dtype(hr, tf.float32)
    lr_float = resize(x, run.input_px, memory_method(run.lr_method)) if run.view == "lr" else x
    lr = np.round(lr_float.numpy() * 255).astype(np.uint8)
    return hr, lr_float, lr


def _rate(fn, tiles: np.ndarray, batch: int, repeats: int) -> float:
    """Median tiles/s of ``fn`` over the tiles in batches (one untimed warm-up pass first)."""
    passes = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        for s in range(0, len(tiles), batch):
            fn(tiles[s : s + batch])
        if i:
            passes.append(len(tiles) / (time.perf_counter() - t))
    return statistics.median(passes)


def main(argv):
    del argv
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.num_threads)
    tf.config.threading.set_inter_op_parallelism_threads(FLAGS.num_threads)
    from kd_histo.evaluation.export import ExportConfig, export
    from kd_histo.evaluation.exported import ExportedModel
    from kd_histo.models import load_model
    from kd_histo.training.run_record import read_run_record

    run = read_run_record(FLAGS.model_dir)
    data_dir = FLAGS.data_dir or run.data_dir
    hr, lr_float, lr = _tiles(run, data_dir, FLAGS.split, FLAGS.max_tiles)
    net = load_model(run.model_path(FLAGS.model_dir))
    keras_fn = tf.function(lambda x: tf.nn.softmax(net(x, training=False)["logits"]))

    ref_hr = np.concatenate(
        [keras_fn(lr_float[s : s + 256]).numpy() for s in range(0, len(hr), 256)]
    )
    lr_as_float = tf.image.convert_image_dtype(lr, tf.float32).numpy()
    ref_lr = np.concatenate(
        [keras_fn(lr_as_float[s : s + 256]).numpy() for s in range(0, len(lr), 256)]
    )
    rows = [
        {
            "format": "keras",
            "quantize": "none",
            "tiles_per_s": _rate(
                lambda b: keras_fn(tf.image.convert_image_dtype(b, tf.float32)),
                lr,
                FLAGS.batch_size,
                FLAGS.repeats,
            ),
        }
    ]
    out_dir = FLAGS.out_dir or os.path.join(FLAGS.model_dir, "exports")
    for fmt, q in FORMATS:
        folder = os.path.join(out_dir, f"{fmt}_{q}")
        t = time.perf_counter()
        export(ExportConfig(FLAGS.model_dir, folder, fmt, q, batch_size=FLAGS.batch_size))
        export_s = time.perf_counter() - t
        m = ExportedModel(folder, num_threads=FLAGS.num_threads)
        p_lr = m.probabilities(lr)
        row = {
            "format": fmt,
            "quantize": q,
            "export_s": round(export_s, 1),
            "size_kb": round(_size(folder, m.record.model) / 1024),
            "agreement_lr": float(np.mean(p_lr.argmax(1) == ref_lr.argmax(1))),
            "max_abs_diff_lr": float(np.abs(p_lr - ref_lr).max()),
            "tiles_per_s": _rate(m.probabilities, lr, FLAGS.batch_size, FLAGS.repeats),
        }
        if run.view == "lr":
            p_hr = m.probabilities(hr, "hr")
            row["agreement_hr"] = float(np.mean(p_hr.argmax(1) == ref_hr.argmax(1)))
            row["max_abs_diff_hr"] = float(np.abs(p_hr - ref_hr).max())
        if fmt == "tflite":
            row["xnnpack"] = m.xnnpack_delegated()
            row["tiles_per_s_no_xnnpack"] = _rate(
                _without_delegates(folder, m), lr, FLAGS.batch_size, FLAGS.repeats
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "model_dir": FLAGS.model_dir,
        "data_dir": data_dir,
        "split": FLAGS.split,
        "n_tiles": len(lr),
        "input_px": run.input_px,
        "hr_px": run.hr_px,
        "batch_size": FLAGS.batch_size,
        "num_threads": FLAGS.num_threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared; indicative)",
        "rows": rows,
    }
    print(json.dumps(result, indent=2))
    print(_table(result))


def _size(folder: str, model: str) -> int:
    path = os.path.join(folder, model)
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _without_delegates(folder: str, m):
    """The same TFLite model in an interpreter without TFLite's default delegates (no XNNPACK)."""
    import tensorflow as tf
    from tensorflow.lite.python.interpreter import OpResolverType

    from kd_histo.evaluation.export import INPUT_NAME, OUTPUT_NAME

    it = tf.lite.Interpreter(
        model_path=os.path.join(folder, m.record.model),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        num_threads=FLAGS.num_threads,
    )
    it.allocate_tensors()
    runner = it.get_signature_runner("serving_default")
    b = m.record.batch_size

    def fn(tiles):
        pad = np.zeros((b - len(tiles), *tiles.shape[1:]), np.uint8)
        return runner(**{INPUT_NAME: np.concatenate([tiles, pad])})[OUTPUT_NAME][: len(tiles)]

    return fn


def _table(result) -> str:
    lines = [
        "| format | quantize | size KB | top-1 agreement (own-µm/px tiles) | top-1 agreement (HR "
        "tiles, hr signature) | max prob diff | tiles/s | tiles/s without XNNPACK |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        agree_lr = f"{100 * r['agreement_lr']:.2f}%" if "agreement_lr" in r else "(reference)"
        agree_hr = f"{100 * r['agreement_hr']:.2f}%" if "agreement_hr" in r else "(reference)"
        diff = f"{r['max_abs_diff_lr']:.2g}" if "max_abs_diff_lr" in r else ""
        no_x = f"{r['tiles_per_s_no_xnnpack']:.0f}" if "tiles_per_s_no_xnnpack" in r else ""
        lines.append(
            f"| {r['format']} | {r['quantize']} | {r.get('size_kb', '')} | {agree_lr} | "
            f"{agree_hr} | {diff} | {r['tiles_per_s']:.0f} | {no_x} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    flags.mark_flag_as_required("model_dir")
    app.run(main)
