"""The maps an out-of-domain score reads, and their statistics, in the net's own graph.

:func:`default_layers` names them for a kd_histo net: its input as scanned (only a net with a stain
normalisation layer, whose other maps no longer see the slide's own colours), its normalised input
("normalize", after any stain normalisation: colour as the trunk sees it), the last block's output
of every stage but the last (``stage<i>_block<j>_out``), each as channel mean and standard
deviation, and the net's last map ("features") as channel means. :func:`tapped` is the saved
functional net with those maps among its outputs (the layers are shared: no copy, no second pass),
and :func:`features_in_graph` turns them into the [B, D] vector
:class:`kd_histo.models.ood.OODStats` scores. The statistics cost two reductions per map: little
beside the convolutions.

Not here: the Gaussians and the score (:mod:`kd_histo.models.ood`).
"""

from __future__ import annotations

import re

import keras
import numpy as np
import tensorflow as tf

FEATURES = "features"  # the net's last feature map (its "features" output)
INPUT = "normalize"  # the net's input normalisation layer: the image as the trunk reads it
POOL = "pool"  # the global average pool of "features" that the head reads
STAIN = "stain_normalize"  # a net's stain normalisation layer (kd_histo.models.stain)
_STAGE_OUT = re.compile(r"stage(\d+)_block(\d+)_out")


def default_layers(model: keras.Model) -> tuple[tuple[str, str], ...]:
    """(layer, moments) of the terms a run's score is fitted on: the input as scanned (a net with
    a stain layer), the normalised input and the stages before the last as "mean_sd", the last
    map as "mean". A net without these layers (not built by :func:`kd_histo.models.build_model`)
    gets the last map alone."""
    names = {layer.name for layer in model.layers}
    last: dict[int, tuple[int, str]] = {}
    for name in names:
        m = _STAGE_OUT.fullmatch(name)
        if m and int(m[2]) >= last.get(int(m[1]), (0, ""))[0]:
            last[int(m[1])] = (int(m[2]), name)
    stages = [last[s][1] for s in sorted(last)][:-1]  # the last stage's map is "features"
    early = ([INPUT] if INPUT in names else []) + stages
    if STAIN in names:  # the tile's colours before the stain layer maps them onto the reference
        early = [model.get_layer(STAIN).input.name, *early]
    return (*((n, "mean_sd") for n in early), (FEATURES, "mean"))


def _pooled(model: keras.Model):
    """The net's own float32 global average pool of its "features" map (kd_histo's nets: layer
    ``pool``), or None: the last map's channel means, already computed for the logits."""
    try:
        pool = model.get_layer(POOL)
    except ValueError:
        return None
    same = pool.input is model.output[FEATURES] and pool.output.dtype == "float32"
    return pool.output if same else None


def tapped(model: keras.Model, layers: tuple[tuple[str, str], ...]) -> keras.Model:
    """``model`` with outputs {"logits": its logits, "maps": [the map of each of ``layers``]}; a
    "features"/"mean" term's map is the net's own pooled [B, C] features where it has them.

    Raises:
      ValueError: a layer the net does not have (statistics fitted on another net).
    """
    outputs = model.output
    maps = []
    for name, moments in layers:
        if name == FEATURES:
            pooled = _pooled(model) if moments == "mean" else None
            maps.append(outputs[FEATURES] if pooled is None else pooled)
            continue
        try:
            maps.append(model.get_layer(name).output)
        except ValueError:
            raise ValueError(
                f"the out-of-domain statistics read layer {name!r}, which this net lacks: "
                "they were fitted on another net; refit them (tools/refit_ood.py)"
            ) from None
    return keras.Model(model.input, {"logits": outputs["logits"], "maps": maps})


def dims(model: keras.Model, layers: tuple[tuple[str, str], ...]) -> list[int]:
    """The width of each term's part of :func:`features_in_graph`'s vector."""
    maps = tapped(model, layers).output["maps"]
    return [int(m.shape[-1]) * (2 if mo == "mean_sd" else 1) for m, (_, mo) in zip(maps, layers)]


def _per_position(maps: list[tf.Tensor]) -> tf.Tensor:
    """[sum of C] float32: 1 / (h w) of each map, repeated over its channels (a constant when the
    maps' sizes are known when traced)."""
    sizes = [(f.shape[1], f.shape[2]) for f in maps]
    if all(h is not None and w is not None for h, w in sizes):
        per = [np.full(f.shape[-1], 1.0 / (h * w)) for f, (h, w) in zip(maps, sizes)]
        return tf.constant(np.concatenate(per), tf.float32)
    return tf.concat(
        [
            tf.fill([f.shape[-1]], 1.0 / tf.cast(tf.shape(f)[1] * tf.shape(f)[2], tf.float32))
            for f in maps
        ],
        axis=0,
    )


def features_in_graph(maps, layers: tuple[tuple[str, str], ...]) -> tf.Tensor:
    """[B, h, w, C] maps -> [B, D] float32: per map, its channel means over the positions, then
    for "mean_sd" its channel standard deviations; concatenated in ``layers`` order. A [B, C]
    "map" is already pooled: its own means (:func:`tapped`).

    Cost (``benchmarks/bench_ood_cost.py``, issue 30): each map is read twice (its mean, its
    Euclidean norm over the positions: the second moment) and never written, where
    ``tf.nn.moments`` read it three times and wrote its squared deviations once; the standard
    deviations of all maps are then one chain of small ops, not one per map (at batch 32 the
    small ops, not the arithmetic, were most of the score's cost). E[x^2] - E[x]^2 in float32
    loses digits only where a channel's mean dwarfs its spread: at 300 times, the sd is off by
    3% (tested); a net's scores equal those of the two-pass graph to 1e-4 (tested)."""
    maps = [tf.cast(f, tf.float32) for f in maps]
    means = [f if f.shape.rank == 2 else tf.reduce_mean(f, axis=[1, 2]) for f in maps]
    spread = [i for i, (_, moments) in enumerate(layers) if moments == "mean_sd"]
    sds = {}
    if spread:
        norms = tf.concat([tf.math.reduce_euclidean_norm(maps[i], axis=[1, 2]) for i in spread], 1)
        first = tf.concat([means[i] for i in spread], axis=1)
        second = tf.square(norms) * _per_position([maps[i] for i in spread])
        sd = tf.sqrt(tf.maximum(second - tf.square(first), 0.0))
        sds = dict(zip(spread, tf.split(sd, [maps[i].shape[-1] for i in spread], axis=1)))
    parts = []
    for i, mean in enumerate(means):
        parts += [mean, sds[i]] if i in sds else [mean]
    return tf.concat(parts, axis=1)


def moments_reference(maps: list[np.ndarray], layers: tuple[tuple[str, str], ...]) -> np.ndarray:
    """NumPy reference of :func:`features_in_graph` (float64)."""
    parts = []
    for f, (_, moments) in zip(maps, layers):
        f = np.asarray(f, np.float64)
        parts.append(f.mean(axis=(1, 2)))
        if moments == "mean_sd":
            parts.append(f.std(axis=(1, 2)))
    return np.concatenate(parts, axis=1)


def feature_function(model: keras.Model, layers: tuple[tuple[str, str], ...]):
    """float images [B, H, W, 3] in [0, 1] -> (logits, [B, D] features), one compiled graph."""
    net = tapped(model, layers)

    @tf.function(reduce_retracing=True)
    def run(x):
        out = net(x, training=False)
        return out["logits"], features_in_graph(out["maps"], layers)

    return run
