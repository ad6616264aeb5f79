"""python benchmarks/bench_ood_variants.py --run=runs/domain_shift/s0/teacher_none

Which out-of-domain score separates the LC25000 lung tiles from tissue of other sites (issue 30)?
Every score is fitted on the run's labeled training tiles and calibrated so that 5% of its val
tiles exceed the threshold (as ``kd_histo.models.ood`` does); printed is the flagged share on the
test tiles, their two shifted copies (``<data_dir>_nct``, ``<data_dir>_hed_strong``, written by
tools/domain_shift.py), the NCT-CRC-HE probe tiles (``--nct_probe``) and the CMU slide's tissue
tiles (``--slide``, read as kd-histo-predict reads it at ``--read_mpp``: at the net's own input
size). Features are cached in ``--cache`` (one .npz per run), so variants are cheap to add.

Scores (the view each net reads, no augmentation):
  pooled_tied      min over classes of the Mahalanobis distance of the pooled last feature map,
                   shared covariance (Lee et al. 2018): kd_histo's score before issue 30's refit
  pooled_classcov  the same with one covariance per class
  energy           -logsumexp(logits) (Liu et al. 2020); msp: -max softmax
  stats_s<i>       per-channel mean and standard deviation of stage i's output map (s0: the
                   net's normalised input, i.e. colour), tied class-conditional Mahalanobis
  stats_s<i>_one   the same, one Gaussian for all classes
  stats_all        s0..s4's statistics concatenated, one Mahalanobis distance
  sum_<set> / max_<set>  Lee et al.'s multi-layer score: each term's distance standardised by
                   its val mean and sd, summed or maxed; max_s0..s3+pooled is kd_histo's stored
                   score since issue 30 (BUILD_NOTES has the table and how it was selected)
"""

from __future__ import annotations

import os
import re
import sys

import numpy as np
from absl import app, flags

flags.DEFINE_string("run", "", "Run folder (teacher or student).")
flags.DEFINE_string("nct_probe", "runs/domain_shift/probes/nct", "NCT tiles as 112 px tiles.")
flags.DEFINE_string("slide", "../shared/data/slides/CMU-1-Small-Region.svs", "A skin slide.")
flags.DEFINE_float("read_mpp", 1.0, "µm/px the slide is read at (as the driver reads it).")
flags.DEFINE_string("cache", "/tmp/bench_ood_cache", "Folder of cached features.")
FLAGS = flags.FLAGS
SHOWN = ("test", "test_nct", "test_hed_strong", "nct_tiles", "cmu_slide")


def _stage_layers(model) -> list[str]:
    """The last block's output of each stage (``stage<i>_block<j>_out``), in stage order."""
    last: dict[int, tuple[int, str]] = {}
    for layer in model.layers:
        m = re.fullmatch(r"stage(\d+)_block(\d+)_out", layer.name)
        if m:
            s, b = int(m[1]), int(m[2])
            if b >= last.get(s, (0, ""))[0]:
                last[s] = (b, layer.name)
    return [last[s][1] for s in sorted(last)]


def _extractor(model):
    """batch -> {name: [B, F]} in one compiled graph: logits, and each stage's channel mean
    and sd."""
    import keras
    import tensorflow as tf

    names = ["normalize", *_stage_layers(model)]  # the input as the trunk sees it (s0), stages
    sub = keras.Model(model.inputs, [*(model.get_layer(n).output for n in names), model.output])

    @tf.function(reduce_retracing=True)
    def run(x):
        res = sub(x, training=False)
        out = {"logits": res[-1]["logits"]}
        mean, var = tf.nn.moments(tf.cast(x, tf.float32), axes=[1, 2])  # before any stain layer
        out["mean_sraw"], out["sd_sraw"] = mean, tf.sqrt(var)
        for i, f in enumerate(res[:-1]):
            mean, var = tf.nn.moments(tf.cast(f, tf.float32), axes=[1, 2])
            out[f"mean_s{i}"], out[f"sd_s{i}"] = mean, tf.sqrt(var)
        return out

    return run, len(names)


def _batches(run, data_dir, split):
    from kd_histo.data.pipeline import make_dataset

    for b in make_dataset(run.pipeline_config(data_dir, 64), split, training=False):
        yield b[run.view], b["label"].numpy()


def _folder(run, path):
    """A tile folder read as kd-histo-predict reads it (HR tiles, the run's view)."""
    import tensorflow as tf

    from kd_histo.data.views import resize
    from kd_histo.evaluation.predict_inputs import folder_tiles
    from kd_histo.evaluation.tile_classifier import memory_lr_method

    tiles = [im for t in folder_tiles(path, run.hr_px, []) for im in t.images]
    x = tf.constant(np.stack(tiles), tf.float32) / 255.0
    if run.view == "lr":
        x = resize(x, run.input_px, memory_lr_method(run))
    yield x, -np.ones(len(tiles), int)


def _slide(run, path, mpp):
    """A slide's tissue tiles read as kd-histo-predict reads them (its defaults)."""
    from kd_histo.evaluation import slide_reader
    from kd_histo.evaluation.predict import PredictConfig
    from kd_histo.evaluation.tile_classifier import memory_lr_method

    cfg = PredictConfig(FLAGS.run, (path,), out_dir="/tmp/unused", read_mpp=mpp)
    plan = slide_reader.plan_read(
        path,
        hr_px=run.hr_px,
        hr_mpp=mpp,
        input_px=run.input_px,
        method=memory_lr_method(run),
        min_tissue=cfg.min_tissue,
        max_tiles=cfg.max_tiles,
        slide_mpp=cfg.slide_mpp,
    )
    for batch in slide_reader.stream_batches(plan, 64, num_workers=0):
        yield np.asarray(batch, np.float32) / 255.0, -np.ones(len(batch), int)


def features(run_dir: str) -> dict[str, dict[str, np.ndarray]]:
    """{set: {feature: [N, F]}} (labels under "label"), cached."""
    path = os.path.join(FLAGS.cache, os.path.normpath(run_dir).replace("/", "+") + ".npz")
    if os.path.isfile(path):
        with np.load(path) as z:
            out: dict[str, dict[str, np.ndarray]] = {}
            for k in z.files:
                s, f = k.split(":")
                out.setdefault(s, {})[f] = z[k]
        if "mean_sraw" in out["val"]:  # a cache of before the input's raw colours: measure again
            return out
    from kd_histo.models import load_model
    from kd_histo.training.run_record import read_run_record

    run = read_run_record(run_dir)
    extract, _ = _extractor(load_model(run.model_path(run_dir)))
    d = os.path.normpath(run.data_dir)
    sources = {
        "val": _batches(run, d, "val"),
        "train": _batches(run, d, "train"),
        "test": _batches(run, d, "test"),
        "test_nct": _batches(run, f"{d}_nct", "test"),
        "test_hed_strong": _batches(run, f"{d}_hed_strong", "test"),
        "nct_tiles": _folder(run, FLAGS.nct_probe),
        "cmu_slide": _slide(run, FLAGS.slide, FLAGS.read_mpp),
    }
    out = {}
    for name, batches in sources.items():
        feats: dict[str, list] = {"label": []}
        for x, y in batches:
            for k, v in extract(x).items():
                feats.setdefault(k, []).append(np.asarray(v, np.float64))
            feats["label"].append(y)
        out[name] = {k: np.concatenate(v) for k, v in feats.items()}
    os.makedirs(FLAGS.cache, exist_ok=True)
    np.savez(path, **{f"{s}:{f}": v for s, fs in out.items() for f, v in fs.items()})
    return out


def _classcov(x_fit, y_fit, k, x):
    from kd_histo.models import ood

    scores = []
    for c in range(k):
        m, p = ood.fit_gaussians(x_fit[y_fit == c], np.zeros((y_fit == c).sum(), int), 1)
        scores.append(ood.mahalanobis_min(x, m, p))
    return np.min(scores, axis=0)


def variants(feats) -> dict[str, dict[str, np.ndarray]]:
    """{variant: {set: scores}}."""
    from kd_histo.models import ood

    y = feats["train"]["label"]
    k = int(y.max()) + 1
    stages = sorted(int(f[6:]) for f in feats["train"] if re.fullmatch(r"mean_s\d+", f))

    def vec(fs, kind, s):
        if kind == "pooled":
            return fs[f"mean_s{s}"]
        return np.concatenate([fs[f"mean_s{s}"], fs[f"sd_s{s}"]], axis=1)

    def tied(kind, s, classes=k):
        yy = y if classes > 1 else np.zeros_like(y)
        m, p = ood.fit_gaussians(vec(feats["train"], kind, s), yy, classes)
        return {n: ood.mahalanobis_min(vec(fs, kind, s), m, p) for n, fs in feats.items()}

    last = stages[-1]
    out = {"pooled_tied": tied("pooled", last)}
    out["pooled_classcov"] = {
        n: _classcov(vec(feats["train"], "pooled", last), y, k, vec(fs, "pooled", last))
        for n, fs in feats.items()
    }
    for n, fs in feats.items():
        z = fs["logits"]
        zmax = z.max(axis=1, keepdims=True)
        lse = (zmax + np.log(np.exp(z - zmax).sum(axis=1, keepdims=True)))[:, 0]
        out.setdefault("energy", {})[n] = -lse
        out.setdefault("msp", {})[n] = -np.exp(z.max(axis=1) - lse)
    for s in ["raw", *stages]:
        out[f"stats_s{s}"] = tied("stats", s)
        out[f"stats_s{s}_one"] = tied("stats", s, 1)
    allv = {n: np.concatenate([vec(fs, "stats", s) for s in stages], 1) for n, fs in feats.items()}
    m, p = ood.fit_gaussians(allv["train"], y, k)
    out["stats_all"] = {n: ood.mahalanobis_min(v, m, p) for n, v in allv.items()}

    def standardised(name):
        v = out[name]["val"]
        return {n: (s - v.mean()) / v.std() for n, s in out[name].items()}

    first, mid = stages[0], stages[1:-1]  # the input (s0), the stages before the last
    combos = {
        "s0+s1": ["stats_s0", "stats_s1"],
        "s1..s4": [f"stats_s{s}" for s in stages[1:]],
        "s0..s4": [f"stats_s{s}" for s in stages],
        "s1..s3+pooled": [*(f"stats_s{s}" for s in mid), "pooled_tied"],
        "s0..s3+pooled": [f"stats_s{first}", *(f"stats_s{s}" for s in mid), "pooled_tied"],
        "raw+s0..s3+pooled": [
            "stats_sraw",
            f"stats_s{first}",
            *(f"stats_s{s}" for s in mid),
            "pooled_tied",
        ],
    }
    for label, names in combos.items():
        zs = [standardised(n) for n in names]
        out[f"sum_{label}"] = {n: np.sum([z[n] for z in zs], axis=0) for n in feats}
        out[f"max_{label}"] = {n: np.max([z[n] for z in zs], axis=0) for n in feats}
    return out


def main(argv):
    del argv
    from kd_histo.models import ood

    feats = features(FLAGS.run)
    scores = variants(feats)
    n = {s: len(feats[s]["label"]) for s in SHOWN}
    print(f"run {FLAGS.run}; flagged % at the val 95th percentile; n = {n}")
    print("| score | " + " | ".join(SHOWN) + " |")
    print("|---|" + "---|" * len(SHOWN))
    for label, by_set in scores.items():
        t = ood.calibrate(by_set["val"])
        cells = [f"{100 * np.mean(by_set[s] > t):.1f}" for s in SHOWN]
        print(f"| {label} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
