"""The paper's backbone: a small ResNet with GroupNorm (DiPalma et al. 2021).

Four stages of ``planes = (32, 64, 128, 256)`` with one BasicBlock each by default (both
configurable), GroupNorm everywhere (no batch statistics, so batch 1 with gradient accumulation
trains the same as a large batch), and an input of ``(None, None, 3)`` so one architecture serves
every resolution. The stem is ImageNet-style (7x7/2 conv + 3x3/2 max-pool) by default; ``stem=
"small"`` (3x3/1 conv, no pool) keeps more resolution for tiny tiles.

Only the trunk lives here (input normalisation and the logits head are added by
:func:`kd_histo.models.build_model`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
from keras import layers, ops

STEMS = ("imagenet", "small")


@keras.saving.register_keras_serializable(package="kd_histo")
class GroupNormalization(layers.GroupNormalization):
    """``keras.layers.GroupNormalization`` of [B, H, W, C] maps, with its statistics reduced faster.

    It keeps Keras' class name because Keras files a layer's weights under its snake-cased class
    name ("layers/group_normalization_3/vars"): so ``.weights.h5`` files and checkpoints written
    with the Keras layer load into these nets and back. Saved ``.keras`` files name it
    ``kd_histo>GroupNormalization``; older ones hold the Keras layer and load as before.

    Same weights, same config, same result (float32 statistics, two-pass variance) up to float
    round-off; only the order of the reductions differs. Keras reduces the reshaped
    [B, H, W, G, C/G] tensor over (H, W, C/G) at once, a strided reduction that TensorFlow's CPU
    kernels run slowly, and its gradient tiles the statistics back; here each statistic is first
    a mean over (H, W) per channel (a contiguous reduction to [B, C]), then over the channels of a
    group on that small tensor, and broadcasts back as [B, 1, C] over a [B, H*W, C] view.
    Forward + backward took 31-40% less CPU time on the paper's 56 and 112 px maps, 7% less on
    7 px ones (one thread, oneDNN on). Any other input rank or axis runs Keras' own code.
    """

    def call(self, inputs):
        if len(inputs.shape) != 4 or self.axis not in (-1, 3):
            return super().call(inputs)
        channels = inputs.shape[-1]
        per_group = channels // self.groups
        shape = ops.shape(inputs)
        # [B, H*W, C] view, in float32 as Keras does under mixed precision. Ending in a reshape
        # back to 4-D, as Keras' layer does, also keeps grappler from merging the final "+ beta"
        # with a following residual Add into an AddN (which rounds differently from eager mode).
        x = ops.reshape(ops.cast(inputs, "float32"), (shape[0], -1, channels))

        def group_mean(v):  # [B, C] -> mean over each group's channels, as [B, 1, C]
            g = ops.mean(ops.reshape(v, (-1, self.groups, per_group)), axis=2, keepdims=True)
            g = ops.broadcast_to(g, (ops.shape(v)[0], self.groups, per_group))
            return ops.reshape(g, (-1, 1, channels))

        centred = x - group_mean(ops.mean(x, axis=1))
        inv = ops.rsqrt(group_mean(ops.mean(ops.square(centred), axis=1)) + self.epsilon)
        if self.scale:
            inv = inv * ops.cast(self.gamma, "float32")
        y = centred * inv
        if self.center:
            y = y + ops.cast(self.beta, "float32")
        return ops.cast(ops.reshape(y, shape), inputs.dtype)


@keras.saving.register_keras_serializable(package="kd_histo")
class Conv2D(layers.Conv2D):
    """``keras.layers.Conv2D`` that runs as one matrix product where the map is tiny.

    Where the output is one pixel of a "valid" conv (stage 4's stride-2 conv on the zero-padded
    2x2 map of an 8x student), a "same" conv reads a 1x1 map (only the kernel's centre tap meets
    data; the other 8 of 9 multiply zero padding), or a 1x1 kernel reads at most
    ``MATMUL_MAX_PIXELS`` pixels, the result is a ``matmul`` of the receptive window with the
    kernel instead of a oneDNN convolution, whose fixed cost per call dominates there: a 28 px
    net's batch of 32 ran 1.13-1.25x faster (BUILD_NOTES.md, "Small maps as matrix products").
    The same sums up to float round-off, and the gradient never reaches oneDNN's convolution
    backward kernels. Static spatial sizes are needed (a traced ``tf.function`` of known tile size
    has them); any other shape, dilation, group count or layout runs Keras' own code. Same class
    name, config and weights as Keras' layer (weights are filed under the snake-cased class name,
    as for :class:`GroupNormalization`); :func:`kd_histo.models.load_model` gives nets saved with
    Keras' layer this one.
    """

    MATMUL_MAX_PIXELS = 4

    def convolution_op(self, inputs, kernel):
        window = self._matmul_window(inputs.shape)
        if window is None:
            return super().convolution_op(inputs, kernel)
        (top, left), (kh, kw), out_hw = window
        kernel_slice = (
            kernel[top : top + kh, left : left + kw] if self.padding == "same" else kernel
        )
        patch = inputs[:, :kh, :kw] if self.padding == "valid" else inputs
        cin = inputs.shape[-1]
        if out_hw == (1, 1):
            rows = ops.reshape(patch, (-1, kh * kw * cin))
        else:  # a 1x1 kernel at stride 1: every pixel is a row
            rows = ops.reshape(inputs, (-1, cin))
        out = ops.matmul(rows, ops.reshape(kernel_slice, (-1, self.filters)))
        return ops.reshape(out, (-1, *out_hw, self.filters))

    def _matmul_window(self, shape):
        """((top, left) kernel offset, (kh, kw) taps used, output (h, w)) or None."""
        if (
            len(shape) != 4
            or self.data_format != "channels_last"
            or tuple(self.dilation_rate) != (1, 1)
            or self.groups != 1
            or shape[1] is None
            or shape[2] is None
            or shape[3] is None
        ):
            return None
        h, w = shape[1], shape[2]
        kh, kw = self.kernel_size
        (sh, sw) = self.strides
        if self.padding == "same" and (h, w) == (1, 1) and kh % 2 and kw % 2:
            return (kh // 2, kw // 2), (1, 1), (1, 1)  # only the centre tap meets the pixel
        if self.padding != "valid" or h < kh or w < kw:
            return None
        out_hw = ((h - kh) // sh + 1, (w - kw) // sw + 1)
        if out_hw == (1, 1):
            return (0, 0), (kh, kw), out_hw
        if (kh, kw) == (1, 1) and (sh, sw) == (1, 1) and h * w <= self.MATMUL_MAX_PIXELS:
            return (0, 0), (1, 1), out_hw
        return None


def group_norm(channels: int, groups: int, name: str) -> layers.Layer:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels``."""
    g = math.gcd(channels, groups)
    return GroupNormalization(groups=g, epsilon=1e-5, name=name)


def norm_layer(kind: str, channels: int, groups: int, name: str) -> layers.Layer:
    """ "group" -> GroupNorm, "batch" -> BatchNorm (PyTorch's momentum 0.1 = Keras' 0.9)."""
    if kind == "group":
        return group_norm(channels, groups, name)
    if kind == "batch":
        return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)
    raise ValueError(f"norm must be 'group' or 'batch', got {kind!r}")


def conv(filters: int, kernel: int, stride: int, name: str) -> layers.Layer:
    # "valid" + explicit ZeroPadding (padded_conv) instead of "same": Keras' "same" pads
    # asymmetrically for stride 2, PyTorch pads k//2 on both sides; we follow PyTorch.
    return Conv2D(filters, kernel, strides=stride, padding="valid", use_bias=False, name=name)


def projection_conv(x, filters: int, stride: int, name: str):
    """1x1 projection shortcut with ``stride``, written as a subsample then a 1x1/1 conv.

    Equal to ``Conv2D(filters, 1, strides=stride)`` (a strided 1x1 conv reads exactly the pixels
    ``x[:, ::stride, ::stride]``; the kernel keeps its name and shape), but its gradient never
    runs oneDNN's strided 1x1 backward-weights kernel: in TF 2.16 (oneDNN 3.3.4, AVX-512) that
    kernel writes past its buffer when the input has fewer than 16 channels, which aborts
    training ("malloc(): corrupted top size", a segfault) -- see BUILD_NOTES.md, "oneDNN".
    """
    if stride > 1:
        # A 1x1 pooling window at stride s is the subsample x[:, ::s, ::s] (ceil(n/s) outputs,
        # as the strided conv); average over one pixel is that pixel, bit for bit.
        x = layers.AveragePooling2D(1, strides=stride, name=f"{name}_subsample")(x)
    return conv(filters, 1, 1, name)(x)


def padded_conv(x, filters: int, kernel: int, stride: int, name: str):
    """Conv with PyTorch's symmetric ``padding=kernel//2``."""
    if kernel > 1 and stride == 1:
        # At stride 1 "same" pads kernel//2 on both sides too, inside the conv kernel: oneDNN runs
        # it faster than ZeroPadding2D + "valid" (forward + backward, one thread: 3.8x on the
        # 1 px maps of 8x students, 1.5x on 2 px, 1.2x on 7 px).
        return Conv2D(filters, kernel, strides=1, padding="same", use_bias=False, name=name)(x)
    if kernel > 1:
        x = layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
    return conv(filters, kernel, stride, name)(x)


def basic_block(x, planes: int, stride: int, norm: str, groups: int, name: str):
    """ResNet BasicBlock: two 3x3 convs, projection shortcut when the shape changes."""
    shortcut = x
    y = padded_conv(x, planes, 3, stride, f"{name}_conv1")
    y = norm_layer(norm, planes, groups, f"{name}_norm1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = padded_conv(y, planes, 3, 1, f"{name}_conv2")
    y = norm_layer(norm, planes, groups, f"{name}_norm2")(y)
    if stride != 1 or x.shape[-1] != planes:
        shortcut = projection_conv(x, planes, stride, f"{name}_down_conv")
        shortcut = norm_layer(norm, planes, groups, f"{name}_down_norm")(shortcut)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_out")(y)


def stem(x, width: int, kind: str, norm: str, groups: int):
    """ImageNet stem (7x7/2 conv, 3x3/2 max-pool) or a small 3x3/1 stem."""
    if kind not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {kind!r}")
    if kind == "imagenet":
        x = padded_conv(x, width, 7, 2, "stem_conv")
    else:
        x = padded_conv(x, width, 3, 1, "stem_conv")
    x = norm_layer(norm, width, groups, "stem_norm")(x)
    x = layers.ReLU(name="stem_relu")(x)
    if kind == "imagenet":
        x = layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
        x = layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)
    return x


def resnet_gn_trunk(
    x,
    *,
    planes: Sequence[int] = (32, 64, 128, 256),
    blocks: Sequence[int] | int = 1,
    groups: int = 8,
    stem_kind: str = "imagenet",
    norm: str = "group",
):
    """Applies the paper's ResNet trunk to tensor ``x``; returns the last feature map.

    Args:
      x: [B, H, W, 3] normalised image tensor (Keras functional).
      planes: width of each stage; stage ``i > 0`` halves the resolution.
      blocks: BasicBlocks per stage (an int applies to every stage).
      groups: GroupNorm groups (reduced to a divisor of each width).
      stem_kind: "imagenet" or "small".
      norm: "group" (the paper) or "batch".

    Returns:
      [B, h, w, planes[-1]] feature map.
    """
    if isinstance(blocks, int):
        blocks = [blocks] * len(planes)
    if len(blocks) != len(planes) or not planes or min(blocks) < 1 or min(planes) < 1:
        raise ValueError(
            f"planes {list(planes)} and blocks {list(blocks)} must be non-empty, positive, "
            "same length"
        )
    x = stem(x, planes[0], stem_kind, norm, groups)
    for s, (width, n) in enumerate(zip(planes, blocks)):
        for b in range(n):
            stride = 2 if (s > 0 and b == 0) else 1
            x = basic_block(x, width, stride, norm, groups, f"stage{s + 1}_block{b + 1}")
    return x
