"""python benchmarks/bench_shift_order.py --runs=<student run>,... --data_dir=<converted tiles>

  PYTHONPATH=. .venv/bin/python benchmarks/bench_shift_order.py \\
      --data_dir=shards/lc25000_true_112 \\
      --runs=runs/domain_shift/s0/student_x8_reinhard,runs/domain_shift/s0/student_x8_none

Why a stain-normalised x8 student loses more than its teacher on a colour-shifted test set
(issue 30). The measured shifts (``kd_histo.data.shifts``: a Reinhard transfer to the NCT tiles'
colours, and the strong HED shift) are applied to the HR tile, as a stain acts on tissue before a
scanner images it; the student then sees the tile shrunk to its LR view. Both shifts are
non-linear in RGB, and an area shrink averages RGB, so shift-then-shrink is not the shift of the
shrunk tile: per-image Reinhard normalisation undoes a Reinhard transfer of the tile it measures,
not of the finer tile it was averaged from. Per run and shift, the accuracy on:

- the original LR views;
- shift then shrink (the HR tile shifted, quantised to uint8 as the shifted test shards are, then
  shrunk: the domain-shift experiment's ``test_nct`` / ``test_hed_strong``);
- shrink then shift (the LR view shifted in float): what the student would lose if the shift
  commuted with the shrink;

and the top-1 agreement of each shifted view with the original one. Nothing is trained.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("runs", [], "Student run folders (x2-x8, any --stain_norm).")
flags.DEFINE_string("data_dir", None, "Converted tiles (dataset.json) of the runs' data.")
flags.DEFINE_string("split", "test", "Split to measure.")
flags.DEFINE_string(
    "nct_dir", "../shared/data/nct_crc_he_samples", "NCT-CRC-HE tiles: the nct shift's colours."
)
flags.DEFINE_integer("batch_size", 128, "Tiles a batch.")


def _tiles(hr_px: int) -> tuple[np.ndarray, np.ndarray]:
    from kd_histo.data.pipeline import PipelineConfig, make_dataset

    tiles, labels = [], []
    cfg = PipelineConfig(data_dir=FLAGS.data_dir, batch_size=64, factor=1.0, hr_px=hr_px)
    for b in make_dataset(cfg, FLAGS.split, training=False):
        tiles.append(np.round(b["hr"].numpy() * 255).astype(np.uint8))
        labels.append(b["label"].numpy())
    return np.concatenate(tiles), np.concatenate(labels)


def _shift_float(spec, images):
    """``spec`` on float [B, H, W, 3] images in [0, 1], without quantising (clipped to [0, 1])."""
    import tensorflow as tf

    from kd_histo.data import stain, stain_norm

    if spec.kind == "hed":
        out = [stain.hed_transform(im, spec.alpha, spec.beta) for im in images]
    else:
        out = [stain_norm.reinhard(im, spec.reference) for im in images]
    return tf.clip_by_value(tf.stack(out), 0.0, 1.0)


def main(argv):
    del argv
    import tensorflow as tf

    from kd_histo.data import shifts
    from kd_histo.data.views import memory_method, resize
    from kd_histo.models import load_model
    from kd_histo.training.run_record import read_run_record

    specs = [shifts.nct_like(FLAGS.nct_dir), shifts.hed_strong()]
    cache: dict = {}
    print(
        "| run | shift | tiles | original | shift then shrink | shrink then shift | "
        "agreement with original: shift then shrink | shrink then shift |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|",
        flush=True,
    )
    for run_dir in FLAGS.runs:
        run = read_run_record(run_dir)
        if run.hr_px not in cache:
            hr, labels = _tiles(run.hr_px)
            shifted = {s.name: np.stack([shifts.apply(s, t) for t in hr]) for s in specs}
            cache[run.hr_px] = hr, labels, shifted
        hr, labels, shifted = cache[run.hr_px]
        net = load_model(run.model_path(run_dir), expected_num_classes=run.num_classes)
        method = memory_method(run.lr_method)

        @tf.function
        def lr_view(b):
            return resize(tf.cast(b, tf.float32) / 255.0, run.input_px, method)

        probs = tf.function(lambda x: tf.nn.softmax(net(x, training=False)["logits"]))

        def top1(views) -> np.ndarray:
            return np.concatenate([probs(v).numpy() for v in views]).argmax(1)

        def batches(a):
            return (a[i : i + FLAGS.batch_size] for i in range(0, len(a), FLAGS.batch_size))

        base = top1(lr_view(b) for b in batches(hr))
        for spec in specs:
            then_shrink = top1(lr_view(b) for b in batches(shifted[spec.name]))
            then_shift = top1(_shift_float(spec, lr_view(b)) for b in batches(hr))
            acc = [float((p == labels).mean()) for p in (base, then_shrink, then_shift)]
            agree = [float((p == base).mean()) for p in (then_shrink, then_shift)]
            print(
                f"| {os.path.normpath(run_dir)} | {spec.name} | {len(labels)} | {acc[0]:.4f} | "
                f"{acc[1]:.4f} | {acc[2]:.4f} | {agree[0]:.4f} | {agree[1]:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    flags.mark_flag_as_required("data_dir")
    app.run(main)
