"""python benchmarks/bench_keras_cv_cost.py [--px=112,56,28,14] [--classes=3]

  PYTHONPATH=. .venv/bin/python benchmarks/bench_keras_cv_cost.py

What a keras-cv backbone costs as a kd_histo net (``--arch=keras_cv:PRESET``, issue 28) beside
kd_histo's own nets: FLOPs of one forward pass per tile side (``kd_histo.evaluation.cost.
count_flops``, the count ``kd-histo-cost`` reports) and parameters, for the LC25000 run's
3 classes. The keras-cv architectures are built from keras-cv's own classes (the architecture of
the presets of that name) and saved as preset folders in a temporary folder, then built by
kd_histo from those folders, so nothing is downloaded; weights are random (FLOPs and parameters
do not depend on them). ``stride``: the net's total stride, the smallest tile kd-histo-train
accepts; ``null`` FLOPs: the net cannot run on a tile that small. Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import tempfile

from absl import app, flags

flags.DEFINE_list("px", ["112", "56", "28", "14"], "Tile sides (HR 112 px and its x2/x4/x8 LR).")
flags.DEFINE_integer("classes", 3, "Number of classes of the head.")
FLAGS = flags.FLAGS

# preset name -> keras-cv class and its architecture (keras-cv's aliases such as ResNet50Backbone
# read the preset's config from Kaggle, so the configs are written out here, as in keras-cv 0.9)
RESNET = dict(stackwise_filters=[64, 128, 256, 512], stackwise_strides=[1, 2, 2, 2])
KERAS_CV = {
    "resnet18": ("ResNetBackbone", dict(stackwise_blocks=[2, 2, 2, 2], block_type="basic_block")),
    "resnet50": ("ResNetBackbone", dict(stackwise_blocks=[3, 4, 6, 3], block_type="block")),
    "mobilenet_v3_small": (  # MobileNetV3Backbone's docstring example: the small layout
        "MobileNetV3Backbone",
        dict(
            stackwise_expansion=[1, 72.0 / 16, 88.0 / 24, 4, 6, 6, 3, 3, 6, 6, 6],
            stackwise_filters=[16, 24, 24, 40, 40, 40, 48, 48, 96, 96, 96],
            stackwise_kernel_size=[3, 3, 3, 5, 5, 5, 5, 5, 5, 5, 5],
            stackwise_stride=[2, 2, 1, 2, 1, 1, 1, 1, 2, 1, 1],
            stackwise_se_ratio=[0.25, None, None] + [0.25] * 8,
            stackwise_activation=["relu"] * 3 + ["hard_swish"] * 8,
        ),
    ),
}


def main(argv):
    del argv
    import keras
    import keras_cv
    from keras_cv.src.utils.preset_utils import save_to_preset

    from kd_histo.evaluation.cost import count_flops
    from kd_histo.models import build_model
    from kd_histo.training.preflight import net_stride

    def gflops(net, px):  # None: the net cannot run on so small a tile (valid-padded convs)
        try:
            return round(count_flops(net, px) / 1e9, 3)
        except ValueError:
            return None

    sides = [int(p) for p in FLAGS.px]
    norm = dict(mean=[0.5] * 3, std=[0.25] * 3)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        nets = {"resnet_gn (kd_histo, paper)": dict(arch="resnet_gn")}
        nets["resnet18 (kd_histo, GroupNorm)"] = dict(arch="resnet18")
        for name, (cls, config) in KERAS_CV.items():
            folder = os.path.join(tmp, name)
            config = {**(RESNET if cls == "ResNetBackbone" else {}), **config}
            save_to_preset(getattr(keras_cv.models, cls)(include_rescaling=True, **config), folder)
            nets[f"keras_cv:{name}"] = dict(arch=f"keras_cv:{folder}")
        for label, kw in nets.items():
            net = build_model(kw["arch"], FLAGS.classes, **norm)
            out[label] = {
                "params": int(net.count_params()),
                "stride": net_stride(net),  # kd-histo-train refuses tiles smaller than this
                "gflops": {str(px): gflops(net, px) for px in sides},
            }
            keras.backend.clear_session()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    app.run(main)
