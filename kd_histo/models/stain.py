"""``StainNormalization``: a run's stain reference as the first layer of its saved network.

The network carries its own normalisation, so whatever feeds it (training, the teacher cache,
kd-histo-evaluate, kd-histo-predict, the exported SavedModel) gives it the same colours without
being told, and a run trained with ``--stain_norm`` cannot be used without it by mistake. Each
image of the batch is normalised on its own (:func:`kd_histo.data.stain_norm.normalise`): a
student's low-resolution view is measured as it is, at its own resolution.

Not here: the ops and the fit of the reference (``kd_histo.data.stain_norm``).
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

from kd_histo.data.stain_norm import StainReference, normalise


@keras.saving.register_keras_serializable(package="kd_histo")
class StainNormalization(layers.Layer):
    """[B, H, W, 3] RGB in [0, 1] -> the same images normalised to ``reference`` (float32).

    Args:
      reference: a :class:`StainReference` or its JSON form (``StainReference.to_json()``).
    """

    def __init__(self, reference: StainReference | dict, **kwargs):
        kwargs.setdefault("dtype", "float32")  # percentiles and eigenvectors: never in float16
        kwargs["trainable"] = False  # no weights; a saved config repeats it
        super().__init__(**kwargs)
        if isinstance(reference, dict):
            reference = StainReference.from_json(reference)
        self.reference = reference

    def call(self, images):
        images = tf.cast(images, tf.float32)
        # The image shape where the graph knows it (an exported graph's fixed input): TFLite
        # lowers the map only with a static element shape.
        return tf.map_fn(
            lambda image: normalise(image, self.reference),
            images,
            fn_output_signature=tf.TensorSpec(images.shape[1:], tf.float32),
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "reference": self.reference.to_json()}


def stain_reference_of(model: keras.Model) -> StainReference | None:
    """The reference of a network's :class:`StainNormalization` layer, or None without one."""
    for layer in model.layers:
        if isinstance(layer, StainNormalization):
            return layer.reference
    return None
