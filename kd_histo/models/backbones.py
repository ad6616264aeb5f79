"""Standard ResNet-18/34/50 trunks built from Keras layers, with GroupNorm or BatchNorm.

Layouts follow torchvision (BasicBlock 2-2-2-2 / 3-4-6-3, Bottleneck 3-4-6-3 with expansion 4,
stride on the 3x3 conv). Nothing is downloaded: pretrained weights come only from a local
``.weights.h5`` file the user points at (see :func:`kd_histo.models.build_model`). Converting
torchvision checkpoints is left out.
"""

from __future__ import annotations

from keras import layers

from kd_histo.models.resnet_gn import basic_block, norm_layer, padded_conv, projection_conv, stem

LAYOUTS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
WIDTHS = (64, 128, 256, 512)


def bottleneck_block(x, planes: int, stride: int, norm: str, groups: int, name: str):
    """ResNet-50 Bottleneck: 1x1 -> 3x3 (stride) -> 1x1 (x4 channels), projection shortcut."""
    out = planes * 4
    y = padded_conv(x, planes, 1, 1, f"{name}_conv1")
    y = norm_layer(norm, planes, groups, f"{name}_norm1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = padded_conv(y, planes, 3, stride, f"{name}_conv2")
    y = norm_layer(norm, planes, groups, f"{name}_norm2")(y)
    y = layers.ReLU(name=f"{name}_relu2")(y)
    y = padded_conv(y, out, 1, 1, f"{name}_conv3")
    y = norm_layer(norm, out, groups, f"{name}_norm3")(y)
    shortcut = x
    if stride != 1 or x.shape[-1] != out:
        shortcut = projection_conv(x, out, stride, f"{name}_down_conv")
        shortcut = norm_layer(norm, out, groups, f"{name}_down_norm")(shortcut)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_out")(y)


def resnet_trunk(x, arch: str, *, norm: str = "group", groups: int = 32, width_scale: float = 1.0):
    """Applies a torchvision-layout ResNet trunk to ``x``; returns the last feature map.

    Args:
      x: [B, H, W, 3] normalised image tensor (Keras functional).
      arch: "resnet18", "resnet34" or "resnet50".
      norm: "group" or "batch".
      groups: GroupNorm groups (reduced to a divisor of each width).
      width_scale: multiplies every width (tests use a small value; 1.0 is the standard net).

    Returns:
      [B, h, w, F] feature map (F = 512 for 18/34, 2048 for 50 at width_scale 1).
    """
    if arch not in LAYOUTS:
        raise ValueError(f"unknown backbone {arch!r}; choose one of {sorted(LAYOUTS)}")
    kind, counts = LAYOUTS[arch]
    widths = [max(1, int(round(w * width_scale))) for w in WIDTHS]
    x = stem(x, widths[0], "imagenet", norm, groups)
    block = basic_block if kind == "basic" else bottleneck_block
    for s, (width, n) in enumerate(zip(widths, counts)):
        for b in range(n):
            stride = 2 if (s > 0 and b == 0) else 1
            x = block(x, width, stride, norm, groups, f"stage{s + 1}_block{b + 1}")
    return x
