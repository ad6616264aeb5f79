"""``Normalization``: the nets' input normalisation, ``(x - mean) / std``, as one multiply-add.

Same class name, config and result (up to float round-off) as ``keras.layers.Normalization``,
whose ``(x - mean) / sqrt(variance)`` broadcasts a 3-vector over rows of 3 numbers: TensorFlow's
CPU kernels run that subtract and divide slowly (0.2 ms of a 28 px net's 2.8 ms call at batch 32).
Here the image is viewed as rows of ``REPEAT`` pixels (where its static size allows) and scaled by
one tiled vector: a 28 px net's batch of 32 ran 1.07-1.08x faster (BUILD_NOTES.md, "Small maps as
matrix products"). Inverted or multi-axis normalisation runs Keras' own code.
"""

from __future__ import annotations

import math

import keras
from keras import layers, ops

REPEAT = 16  # pixels per row of the multiply-add, where the image's pixel count allows


@keras.saving.register_keras_serializable(package="kd_histo")
class Normalization(layers.Normalization):
    """``keras.layers.Normalization`` of channels-last images, as ``x * (1/std) - mean/std``."""

    def call(self, inputs):
        shape = inputs.shape
        last = len(shape) - 1
        if (
            self.invert
            or self.mean is None
            or tuple(a % len(shape) for a in self.axis) != (last,)
            or shape[-1] is None
        ):
            return super().call(inputs)
        x = ops.convert_to_tensor(inputs, dtype=self.compute_dtype)
        channels = shape[-1]
        mean = ops.reshape(ops.cast(self.mean, self.compute_dtype), (channels,))
        variance = ops.reshape(ops.cast(self.variance, self.compute_dtype), (channels,))
        scale = 1.0 / ops.maximum(ops.sqrt(variance), keras.backend.epsilon())
        pixels = math.prod(shape[1:-1]) if None not in shape[1:-1] else 1
        repeat = math.gcd(REPEAT, pixels) if len(shape) > 2 else 1
        rows = ops.reshape(x, (-1, channels * repeat))
        y = rows * ops.tile(scale, (repeat,)) + ops.tile(-mean * scale, (repeat,))
        return ops.reshape(y, ops.shape(x))
