"""The maps an out-of-domain score reads, and their statistics, in the net's own graph.

:func:`default_layers` names them for a kd_histo net: its normalised input ("normalize", after
any stain normalisation: colour as the trunk sees it), the last block's output of every stage but
the last (``stage<i>_block<j>_out``), each as channel mean and standard deviation, and the net's
last map ("features") as channel means. :func:`tapped` is the saved functional net with those
maps among its outputs (the layers are shared: no copy, no second pass), and
:func:`features_in_graph` turns them into the [B, D] vector :class:`kd_histo.models.ood.OODStats`
scores. The statistics cost a reduction per map: nothing beside the convolutions.

Not here: the Gaussians and the score (:mod:`kd_histo.models.ood`).
"""

from __future__ import annotations

import re

import keras
import numpy as np
import tensorflow as tf

FEATURES = "features"  # the net's last feature map (its "features" output)
INPUT = "normalize"  # the net's input normalisation layer: the image as the trunk reads it
_STAGE_OUT = re.compile(r"stage(\d+)_block(\d+)_out")


def default_layers(model: keras.Model) -> tuple[tuple[str, str], ...]:
    """(layer, moments) of the terms a run's score is fitted on: the input and the stages before
    the last as "mean_sd", the last map as "mean". A net without these layers (not built by
    :func:`kd_histo.models.build_model`) gets the last map alone."""
    names = {layer.name for layer in model.layers}
    last: dict[int, tuple[int, str]] = {}
    for name in names:
        m = _STAGE_OUT.fullmatch(name)
        if m and int(m[2]) >= last.get(int(m[1]), (0, ""))[0]:
            last[int(m[1])] = (int(m[2]), name)
    stages = [last[s][1] for s in sorted(last)][:-1]  # the last stage's map is "features"
    early = ([INPUT] if INPUT in names else []) + stages
    return (*((n, "mean_sd") for n in early), (FEATURES, "mean"))


def tapped(model: keras.Model, layers: tuple[tuple[str, str], ...]) -> keras.Model:
    """``model`` with outputs {"logits": its logits, "maps": [the map of each of ``layers``]}.

    Raises:
      ValueError: a layer the net does not have (statistics fitted on another net).
    """
    outputs = model.output
    maps = []
    for name, _ in layers:
        if name == FEATURES:
            maps.append(outputs[FEATURES])
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


def features_in_graph(maps, layers: tuple[tuple[str, str], ...]) -> tf.Tensor:
    """[B, h, w, C] maps -> [B, D] float32: per map, its channel means over the positions, then
    for "mean_sd" its channel standard deviations; concatenated in ``layers`` order."""
    parts = []
    for f, (_, moments) in zip(maps, layers):
        mean, var = tf.nn.moments(tf.cast(f, tf.float32), axes=[1, 2])
        parts.append(mean)
        if moments == "mean_sd":
            parts.append(tf.sqrt(tf.maximum(var, 0.0)))
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
