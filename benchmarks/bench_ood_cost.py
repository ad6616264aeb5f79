"""python benchmarks/bench_ood_cost.py [--batch_sizes=32,64,256] [--passes=31]

What the out-of-domain score costs the x8 student at inference (issue 30's target: at most 5% of
its inference time). The cost does not depend on trained weights, so the net is an untrained
student as kd_histo builds it for the LC25000 experiment (flags/lc25000/experiment.flags: 112 px
tiles at factor 8, i.e. 14 px inputs, ResNet-GN 16-32-64-128, small stem), with out-of-domain
statistics fitted (``kd_histo.models.ood.fit``, the run's default terms) on the features of
random tiles. Timed, per batch size, over ``--tiles`` random tiles (899: the LC25000 test split):

  plain     ``kd_histo.evaluation.evaluate.probs_function``: what kd-histo-evaluate runs without
            statistics
  features  the tapped net and its map statistics (``ood_report.probs_and_ood_features``), no score
  ood       ``ood_report.probs_and_ood_function``: probabilities and scores, what kd-histo-evaluate
            runs with the run's ood.npz
  before    the same with the graph of before issue 30's cost work (``tf.nn.moments`` per map,
            one block-diagonal whitening of all terms, [B, K, dim] differences), kept here to
            time against

Each batch is run by every variant in turn (the order rotating from batch to batch) and each
pass's time summed per variant, so a busy machine's changing load falls on all alike; printed are
the median and the minimum over the passes of process CPU time (all threads) and of wall time,
and each variant's extra time against ``plain`` (of the medians, of the minima, and paired: the
median of each pass's own ratio).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from absl import app, flags

flags.DEFINE_list("batch_sizes", ["32", "64", "256"], "Tiles per call (evaluate: 32, driver: 64).")
flags.DEFINE_integer("passes", 31, "Timed passes over the tiles per batch size.")
flags.DEFINE_integer("tiles", 899, "Tiles per pass.")
flags.DEFINE_integer("input_px", 14, "The student's input: 112 px tiles at factor 8.")
flags.DEFINE_list("planes", ["16", "32", "64", "128"], "Stage widths (the LC25000 experiment's).")
flags.DEFINE_integer("threads", 0, "TensorFlow intra/inter-op threads (0 = TensorFlow's default).")
FLAGS = flags.FLAGS


def student_and_stats(input_px: int, planes: tuple[int, ...], seed: int = 0):
    """An untrained x8 student and out-of-domain statistics fitted on random tiles' features."""
    import keras

    from kd_histo.models import build_model, ood, ood_features

    keras.utils.set_random_seed(seed)
    model = build_model(
        "resnet_gn",
        3,
        mean=(0.7, 0.55, 0.75),
        std=(0.15, 0.2, 0.12),
        planes=planes,
        stem="small",
        name="distill",
    )
    layers = ood_features.default_layers(model)
    features_of = ood_features.feature_function(model, layers)
    rng = np.random.default_rng(seed)

    def feats(n):
        _, f = features_of(rng.uniform(size=(n, input_px, input_px, 3)).astype(np.float32))
        return np.asarray(f, np.float64)

    cuts = np.cumsum(ood_features.dims(model, layers))[:-1]
    train, val = feats(300), feats(150)
    labels = np.repeat(np.arange(3), 100)
    stats = ood.fit(np.split(train, cuts, 1), labels, np.split(val, cuts, 1), 3, layers)
    return model, stats


def previous_features(maps, layers):
    """``ood_features.features_in_graph`` before issue 30's cost work."""
    import tensorflow as tf

    parts = []
    for f, (_, moments) in zip(maps, layers):
        mean, var = tf.nn.moments(tf.cast(f, tf.float32), axes=[1, 2])
        parts.append(mean)
        if moments == "mean_sd":
            parts.append(tf.sqrt(tf.maximum(var, 0.0)))
    return tf.concat(parts, axis=1)


def previous_scores(features, stats):
    """``ood_report.scores_in_graph`` before issue 30's cost work."""
    import tensorflow as tf

    terms = stats.terms
    chol = [np.linalg.cholesky(t.precision) for t in terms]
    whiten = np.zeros((stats.dim, stats.dim))
    means = np.concatenate([t.means @ c for t, c in zip(terms, chol)], axis=1)
    member = np.zeros((stats.dim, len(terms)))
    start = 0
    for i, (t, c) in enumerate(zip(terms, chol)):
        whiten[start : start + t.dim, start : start + t.dim] = c
        member[start : start + t.dim, i] = 1.0
        start += t.dim
    y = features @ tf.constant(whiten, tf.float32)
    sq = tf.square(y[:, None, :] - tf.constant(means, tf.float32)[None])
    d = tf.reduce_min(tf.einsum("bkd,dt->bkt", sq, tf.constant(member, tf.float32)), axis=1)
    center = tf.constant([t.center for t in terms], tf.float32)
    scale = tf.constant([t.scale for t in terms], tf.float32)
    return tf.reduce_max((d - center) / scale, axis=1)


def _before(model, stats):
    import keras
    import tensorflow as tf

    # before: every map tapped as is, the last one pooled again
    named = [model.get_layer(n).output for n, _ in stats.layers[:-1]]
    net = keras.Model(model.input, {**model.output, "maps": [*named, model.output["features"]]})

    def both(x):
        out = net(x, training=False)
        probs = tf.nn.softmax(tf.cast(out["logits"], tf.float32))
        return probs, previous_scores(previous_features(out["maps"], stats.layers), stats)

    fn = tf.function(both).get_concrete_function(tf.TensorSpec([None, None, None, 3], tf.float32))

    def run(x):
        probs, scores = fn(tf.convert_to_tensor(x))
        return probs.numpy(), scores.numpy()

    return run


def variants(model, stats, input_px: int) -> dict:
    """name -> numpy batch function, each traced once (``features`` for ``input_px`` tiles, as
    ``probs_and_ood_function`` traces per tile size; ``before`` for any size, as it did)."""
    import tensorflow as tf

    from kd_histo.evaluation import evaluate, ood_report

    probs_and_features = ood_report.probs_and_ood_features(model, stats)
    fn = tf.function(probs_and_features).get_concrete_function(
        tf.TensorSpec([None, input_px, input_px, 3], tf.float32)
    )

    def features(x):
        probs, f = fn(tf.convert_to_tensor(x))
        return probs.numpy(), f.numpy()

    return {
        "plain": evaluate.probs_function(model),
        "features": features,
        "ood": ood_report.probs_and_ood_function(model, stats),
        "before": _before(model, stats),
    }


def time_interleaved(fns: dict, batches: list[np.ndarray], passes: int) -> dict:
    """name -> {"cpu": [s per pass], "wall": [s per pass]}, batch by batch in rotating order."""
    names = list(fns)
    for name in names:  # warm-up: traced, and every batch shape seen once
        for b in batches[:1] + batches[-1:]:
            fns[name](b)
    out = {n: {"cpu": [], "wall": []} for n in names}
    for r in range(passes):
        cpu = dict.fromkeys(names, 0.0)
        wall = dict.fromkeys(names, 0.0)
        for i, b in enumerate(batches):
            k = (r + i) % len(names)
            for name in names[k:] + names[:k]:
                c0, w0 = time.process_time(), time.perf_counter()
                fns[name](b)
                cpu[name] += time.process_time() - c0
                wall[name] += time.perf_counter() - w0
        for name in names:
            out[name]["cpu"].append(cpu[name])
            out[name]["wall"].append(wall[name])
    return out


def report(times: dict, batch: int, tiles: int) -> list[str]:
    """One line per variant: per clock, the median and minimum ms per pass, and its extra time
    against ``plain``: of the medians, of the minima, and the median over passes of each pass's
    own ratio (paired: the steadiest on a busy machine)."""
    lines = []
    plain = times["plain"]
    for name, t in times.items():
        cells = []
        for clock in ("cpu", "wall"):
            med, low = statistics.median(t[clock]), min(t[clock])
            cell = f"{clock} {1e3 * med:.1f} / {1e3 * low:.1f} ms"
            if name != "plain":
                paired = statistics.median(a / b for a, b in zip(t[clock], plain[clock]))
                cell += (
                    f" ({100 * (med / statistics.median(plain[clock]) - 1):+.1f}% median, "
                    f"{100 * (low / min(plain[clock]) - 1):+.1f}% min, "
                    f"{100 * (paired - 1):+.1f}% paired)"
                )
            cells.append(cell)
        lines.append(f"batch {batch:4d} {name:8s} " + "; ".join(cells))
    return lines


def main(argv):
    del argv
    import tensorflow as tf

    if FLAGS.threads:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
        tf.config.threading.set_inter_op_parallelism_threads(FLAGS.threads)
    model, stats = student_and_stats(FLAGS.input_px, tuple(int(p) for p in FLAGS.planes))
    print(
        f"x8 student: {model.count_params()} parameters, {FLAGS.input_px} px inputs; terms "
        + ", ".join(f"{t.layer} ({t.moments}, {t.dim})" for t in stats.terms)
    )
    fns = variants(model, stats, FLAGS.input_px)
    rng = np.random.default_rng(1)
    tiles = rng.uniform(size=(FLAGS.tiles, FLAGS.input_px, FLAGS.input_px, 3)).astype(np.float32)
    now, before = fns["ood"](tiles[:64])[1], fns["before"](tiles[:64])[1]
    print(f"scores: largest difference to the graph of before {np.abs(now - before).max():.2g}")
    for batch in (int(b) for b in FLAGS.batch_sizes):
        batches = [tiles[i : i + batch] for i in range(0, len(tiles), batch)]
        times = time_interleaved(fns, batches, FLAGS.passes)
        print("\n".join(report(times, batch, FLAGS.tiles)), flush=True)
    print(f"(ms per pass over {FLAGS.tiles} tiles: median / minimum of {FLAGS.passes} passes)")


if __name__ == "__main__":
    app.run(main)
