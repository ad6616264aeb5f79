"""python benchmarks/bench_ood_variants.py --run=runs/domain_shift/s0/teacher_none

Which out-of-domain score separates the LC25000 lung tiles from tissue of other sites (issue 30)?
Every score is fitted on the run's labeled training tiles and calibrated so that 5% of its val
tiles exceed the threshold (as ``kd_histo.models.ood`` does); printed is the flagged share on the
test tiles, their two shifted copies (``<data_dir>_nct``, ``<data_dir>_hed_strong``, written by
tools/domain_shift.py), the NCT-CRC-HE probe tiles and the CMU slide's tissue tiles
(``--cmu_shards``: kd-histo-convert --slides=../shared/data/slides/CMU-1-Small-Region.svs
--out_dir=shards/cmu_slide_112 --tile_px=112 --target_mpp=1.0).

Scores (the view each net reads, no augmentation):
  pooled_tied      kd_histo's score: min over classes of the Mahalanobis distance of the pooled
                   last feature map, shared covariance (Lee et al. 2018)
  pooled_classcov  the same with one covariance per class
  energy           -logsumexp(logits) (Liu et al. 2020); msp: -max softmax
  stats_<block>    per-channel mean and standard deviation of a block's output map, tied
                   class-conditional Mahalanobis (low-level statistics: colour, texture)
  stats_all        stats of the four stages concatenated
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

flags.DEFINE_string("run", "", "Run folder (teacher or student).")
flags.DEFINE_string("nct_probe", "runs/domain_shift/probes/nct", "NCT tiles as 112 px tiles.")
flags.DEFINE_string("cmu_shards", "shards/cmu_slide_112", "The CMU slide converted (unlabeled).")
FLAGS = flags.FLAGS
BLOCKS = ("stage1_block1_out", "stage2_block1_out", "stage3_block1_out", "stage4_block1_out")


def _batches(run, data_dir, split):
    """(view batch, labels) of a split, streamed."""
    from kd_histo.data.pipeline import make_dataset

    for b in make_dataset(run.pipeline_config(data_dir, 64), split, training=False):
        yield b[run.view], b["label"].numpy()


def _folder(run, path):
    """The tiles of a folder (predict's reading), through the run's view, as one batch."""
    import tensorflow as tf

    from kd_histo.data.views import resize
    from kd_histo.evaluation.predict import memory_lr_method
    from kd_histo.evaluation.predict_inputs import folder_tiles

    tiles = [im for t in folder_tiles(path, run.hr_px, []) for im in t.images]
    x = tf.constant(np.stack(tiles), tf.float32) / 255.0
    if run.view == "lr":
        x = resize(x, run.input_px, memory_lr_method(run))
    yield x, -np.ones(len(tiles), int)


def _extractor(model):
    """batch -> {name: [B, F] features} in one compiled graph (pooled maps and block stats)."""
    import keras
    import tensorflow as tf

    outs = [model.get_layer(b).output for b in BLOCKS]
    sub = keras.Model(model.inputs, [*outs, model.output["logits"]])

    @tf.function(reduce_retracing=True)
    def run(x):
        res = sub(x, training=False)
        out = {"logits": res[-1], "pooled": tf.reduce_mean(res[len(BLOCKS) - 1], axis=[1, 2])}
        for b, f in zip(BLOCKS, res):
            mean, var = tf.nn.moments(f, axes=[1, 2])
            out[f"stats_{b[:6]}"] = tf.concat([mean, tf.sqrt(var)], axis=1)
        out["stats_all"] = tf.concat([out[f"stats_{b[:6]}"] for b in BLOCKS], axis=1)
        return out

    return run


def _features(extract, batches):
    feats, labels = {}, []
    for x, y in batches:
        for k, v in extract(x).items():
            feats.setdefault(k, []).append(np.asarray(v, np.float64))
        labels.append(y)
    return {k: np.concatenate(v) for k, v in feats.items()}, np.concatenate(labels)


def _classcov_scores(x_fit, y_fit, k, x):
    from kd_histo.models import ood

    scores = []
    for c in range(k):
        m, p = ood.fit_gaussians(x_fit[y_fit == c], np.zeros((y_fit == c).sum(), int), 1)
        scores.append(ood.mahalanobis_min(x, m, p))
    return np.min(scores, axis=0)


def main(argv):
    del argv
    from kd_histo.models import load_model, ood
    from kd_histo.training.run_record import read_run_record

    run = read_run_record(FLAGS.run)
    model = load_model(run.model_path(FLAGS.run))
    d = run.data_dir
    extract = _extractor(model)
    sources = {
        "val": _batches(run, d, "val"),
        "train": _batches(run, d, "train"),
        "test": _batches(run, d, "test"),
        "test_nct": _batches(run, f"{os.path.normpath(d)}_nct", "test"),
        "test_hed_strong": _batches(run, f"{os.path.normpath(d)}_hed_strong", "test"),
        "nct_tiles": _folder(run, FLAGS.nct_probe),
        "cmu_slide": _batches(run, FLAGS.cmu_shards, "unlabeled"),
    }
    feats, labels = {}, {}
    for name, batches in sources.items():
        feats[name], labels[name] = _features(extract, batches)
    y = labels["train"]
    k = run.num_classes
    scores: dict[str, dict[str, np.ndarray]] = {}
    for name in ("pooled", *[f"stats_{b[:6]}" for b in BLOCKS], "stats_all"):
        m, p = ood.fit_gaussians(feats["train"][name], y, k)
        label = "pooled_tied" if name == "pooled" else name
        scores[label] = {s: ood.mahalanobis_min(f[name], m, p) for s, f in feats.items()}
    scores["pooled_classcov"] = {
        s: _classcov_scores(feats["train"]["pooled"], y, k, f["pooled"]) for s, f in feats.items()
    }
    for s, f in feats.items():
        z = f["logits"]
        zmax = z.max(axis=1, keepdims=True)
        lse = (zmax + np.log(np.exp(z - zmax).sum(axis=1, keepdims=True)))[:, 0]
        scores.setdefault("energy", {})[s] = -lse
        scores.setdefault("msp", {})[s] = -np.exp(z.max(axis=1) - lse)
    shown = ("test", "test_nct", "test_hed_strong", "nct_tiles", "cmu_slide")
    n = {s: len(labels[s]) for s in shown}
    print(f"run {FLAGS.run}; flagged % at the val 95th percentile; n = {n}")
    print("| score | " + " | ".join(shown) + " |")
    print("|---|" + "---|" * len(shown))
    for label, by_set in scores.items():
        t = ood.calibrate(by_set["val"])
        cells = [f"{100 * np.mean(by_set[s] > t):.1f}" for s in shown]
        print(f"| {label} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
