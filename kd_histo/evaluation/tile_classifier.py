"""The models on uint8 tiles, as compiled graphs: (class probabilities, out-of-domain features).

:func:`slide_classifier` takes tiles already at the model's input size (read from a slide's
pyramid level); :func:`hr_classifier` takes HR tiles in memory and makes the run's view as
training made it. One ``tf.function`` per model and view: eager calls would leave TensorFlow's
constants behind on every batch (memory growing with the number of inputs of a cohort).

Not here: reading tiles (``kd_histo.evaluation.slide_reader``, ``predict_inputs``), what is done
with the probabilities (``kd_histo.evaluation.predict``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from kd_histo.training.run_record import RunRecord


def slide_classifier(model, input_px: int, stats=None):
    """(class probabilities, the features ``stats`` scores) of uint8 tiles
    ``[n, input_px, input_px, 3]`` (the model's input size), as one compiled graph for any ``n``,
    traced once (:func:`kd_histo.evaluation.ood_report.probs_and_ood_features`; ``stats``: the
    run's :class:`kd_histo.models.ood.OODStats` or None). Each tile's outputs do not depend on the
    batch size."""
    import tensorflow as tf

    from kd_histo.evaluation.ood_report import probs_and_ood_features

    probs_and_features = probs_and_ood_features(model, stats)

    @tf.function(input_signature=[tf.TensorSpec([None, input_px, input_px, 3], tf.uint8)])
    def classify(images):
        return probs_and_features(tf.cast(images, tf.float32) / 255.0)

    return classify


def batched(images: Iterator[np.ndarray], n: int) -> Iterator[np.ndarray]:
    batch = []
    for im in images:
        batch.append(im)
        if len(batch) == n:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def memory_lr_method(run: RunRecord) -> str:
    """How an LR view is made from HR tiles in memory: the run's ``lr_method``; "area" for a
    "pyramid" run (no stored pyramid tile here: the nearest antialiased resize, as conversion's
    pyramid-free fallback)."""
    return "area" if run.lr_method == "pyramid" else run.lr_method


def classify_tiles(
    classify, images: Iterator[np.ndarray], run: RunRecord, batch_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities, out-of-domain features) of HR tiles in memory, through the run's view
    (``classify``: :func:`hr_classifier`)."""
    out, emb = [], []
    for b in batched(images, batch_size):
        probs, pooled = classify(b)
        out.append(probs.numpy())
        emb.append(pooled.numpy())
    if not out:
        return np.zeros((0, run.num_classes), np.float32), None
    return np.concatenate(out), np.concatenate(emb)


def hr_classifier(model, run: RunRecord, stats=None):
    """One compiled graph per model and view: uint8 HR tiles -> (probabilities, the features
    ``stats`` scores), the LR view made as training made it. Eager calls would leave
    TensorFlow's constants behind on every batch (memory growing with the number of inputs)."""
    import tensorflow as tf

    from kd_histo.data.views import resize
    from kd_histo.evaluation.ood_report import probs_and_ood_features

    view, input_px, method = run.view, run.input_px, memory_lr_method(run)
    probs_and_features = probs_and_ood_features(model, stats)

    @tf.function(reduce_retracing=True)
    def classify(images):
        x = tf.cast(images, tf.float32) / 255.0
        if view == "lr":  # the run's factor and method
            x = resize(x, input_px, method)
        return probs_and_features(x)

    return classify
