"""Networks of kd_histo: one builder for the teacher, baseline and student nets, and a loader.

Every net takes float32 RGB in [0, 1] of any size (``(None, None, 3)``), normalises it in its first
layer by the data set's mean/std (a ``keras.layers.Normalization``, run as one multiply-add by
:mod:`kd_histo.models.normalize`, whose mean/variance sit in the layer config, so a saved
``.keras`` file is self-contained), and returns a dict
``{"logits": [B, C] float32, "features": [B, h, w, F]}`` where ``features`` is the last conv map
before pooling. Under a mixed-precision policy the logits pass through a final float32 layer.

Architectures: ``resnet_gn`` (the paper's), ``resnet18``, ``resnet34``, ``resnet50``, and
``keras_cv:NAME``, a keras-cv backbone preset (:mod:`kd_histo.models.keras_cv_backbone`: a preset
folder on disk, or a preset name downloaded when online, its pretrained weights with
``weights="imagenet"``). For kd_histo's own nets ``weights=`` loads a local ``.weights.h5`` file
into the whole net; they are never downloaded.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import layers

from kd_histo.data.stain_norm import StainReference
from kd_histo.models import keras_cv_backbone as kcv
from kd_histo.models.backbones import LAYOUTS, resnet_trunk
from kd_histo.models.normalize import Normalization
from kd_histo.models.resnet_gn import STEMS, Conv2D, GroupNormalization, resnet_gn_trunk
from kd_histo.models.stain import StainNormalization
from kd_histo.settings import setting

ARCHS = ("resnet_gn",) + tuple(LAYOUTS)

# How the nets compute, where it changes outputs' low bits: in kd-histo-predict's fingerprint, so an
# out_dir is not resumed with outputs of another formulation (kd_histo.models.normalize, and
# resnet_gn.Conv2D's matrix products on small maps).
NET_OPS = "small maps as matmuls, normalisation as one multiply-add"


@dataclasses.dataclass(frozen=True)
class NetConfig:
    """Which network to build: the architecture a run chooses (the ``net`` of its config.json).

    Attributes:
      arch: "resnet_gn" (the paper's), "resnet18", "resnet34", "resnet50" or "keras_cv:NAME" (a
        keras-cv backbone preset: a built-in name or a preset folder).
      planes: stage widths of resnet_gn.
      blocks: BasicBlocks per stage of resnet_gn.
      groups: GroupNorm groups (8 for resnet_gn, 32 for the standard ResNets when None).
      norm: "group" or "batch".
      stem: resnet_gn stem, "imagenet" or "small".
      width_scale: width multiplier of the standard ResNets.
      weights: initial weights: "none" (random), "imagenet" (a keras-cv preset's pretrained
        weights, downloaded when online) or a local path (kd_histo nets: a ``.weights.h5`` file of
        the whole net; keras-cv backbones: a preset folder or the backbone's ``.weights.h5``).
    """

    arch: str = setting(
        "resnet_gn",
        "Network: resnet_gn (paper), resnet18, resnet34, resnet50, or keras_cv:PRESET (a keras-cv "
        "backbone preset name, downloaded when online, or a preset folder on disk).",
    )
    planes: tuple[int, ...] = setting((32, 64, 128, 256), "Stage widths of resnet_gn.")
    blocks: int | tuple[int, ...] = 1
    groups: int | None = None
    norm: str = setting("group", "Normalisation layers: group or batch.")
    stem: str = setting("imagenet", "resnet_gn stem: imagenet (stride 4) or small (stride 1).")
    width_scale: float = 1.0
    weights: str = setting(
        "none",
        "Initial weights: none, imagenet (keras_cv:PRESET's pretrained weights) or a path (a "
        "keras-cv preset folder, or a .weights.h5 file).",
    )

    def __post_init__(self):
        if self.arch not in ARCHS and not kcv.is_keras_cv(self.arch):
            raise ValueError(
                f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)} or keras_cv:PRESET"
            )
        kcv.check_arch(self.arch, self.weights)
        if not self.planes or min(self.planes) < 1:
            raise ValueError(
                f"planes must be stage widths >= 1 (e.g. 32,64,128,256), got {self.planes}"
            )
        if self.norm not in ("group", "batch"):
            raise ValueError(f"norm must be 'group' or 'batch', got {self.norm!r}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")

    def build_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`build_model` beyond arch, num_classes, mean and std."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(NetConfig)[1:]}


@dataclasses.dataclass(frozen=True)
class ModelConfig(NetConfig):
    """Everything needed to rebuild a net: its :class:`NetConfig` and what the data set and the
    run add.

    Attributes:
      num_classes: number of output logits.
      mean: per-channel RGB mean in [0, 1] (from dataset.json).
      std: per-channel RGB standard deviation (from dataset.json), > 0.
      name: Keras model name.
      stain_reference: when set, the net's first layer normalises each input's stain to it
        (:class:`kd_histo.models.stain.StainNormalization`), before the mean/std normalisation.
    """

    num_classes: int = 2
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    name: str = "net"
    stain_reference: StainReference | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(
                f"mean and std must be 3 values each with std > 0, got {self.mean}, {self.std}"
            )


def _tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def build_model(
    arch: str, num_classes: int, *, mean: Sequence[float], std: Sequence[float], **kwargs: Any
) -> keras.Model:
    """Builds a net of the contract (input [0, 1] RGB, dict of logits and features).

    Args:
      arch: "resnet_gn", "resnet18", "resnet34" or "resnet50".
      num_classes: number of classes.
      mean: per-channel mean of the training split (dataset.json).
      std: per-channel std of the training split (dataset.json).
      **kwargs: other :class:`ModelConfig` fields (planes, blocks, groups, norm, stem, width_scale,
        weights, name).

    Returns:
      A functional ``keras.Model``.
    """
    unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise TypeError(
            f"build_model got unknown options {unknown}; see kd_histo.models.ModelConfig"
        )
    kwargs = {k: _tuple(v) for k, v in kwargs.items()}
    cfg = ModelConfig(
        arch=arch, num_classes=num_classes, mean=tuple(mean), std=tuple(std), **kwargs
    )
    return build_from_config(cfg)


def build_from_config(cfg: ModelConfig) -> keras.Model:
    """Builds the net described by ``cfg`` (and loads ``cfg.weights`` when set)."""
    backbone = kcv.load_backbone(cfg.arch, cfg.weights) if kcv.is_keras_cv(cfg.arch) else None
    mean, std = cfg.mean, cfg.std
    if backbone is not None and backbone.mean is not None:  # what its preset was trained on
        mean, std = backbone.mean, backbone.std
    inputs = keras.Input((None, None, 3), name="image")
    x = inputs
    if cfg.stain_reference is not None:
        x = StainNormalization(cfg.stain_reference, name="stain_normalize")(x)
    x = Normalization(mean=list(mean), variance=[s * s for s in std], name="normalize")(x)
    if backbone is not None:
        feats = backbone.model(x)
    elif cfg.arch == "resnet_gn":
        feats = resnet_gn_trunk(
            x,
            planes=cfg.planes,
            blocks=cfg.blocks,
            groups=cfg.groups or 8,
            stem_kind=cfg.stem,
            norm=cfg.norm,
        )
    else:
        feats = resnet_trunk(
            x, cfg.arch, norm=cfg.norm, groups=cfg.groups or 32, width_scale=cfg.width_scale
        )
    pooled = layers.GlobalAveragePooling2D(name="pool")(feats)
    logits = layers.Dense(cfg.num_classes, name="head")(pooled)
    # Softmax/CE of float16 logits loses precision; the contract promises float32 logits.
    logits = layers.Activation("linear", dtype="float32", name="logits")(logits)
    model = keras.Model(inputs, {"logits": logits, "features": feats}, name=cfg.name)
    if backbone is None and cfg.weights not in kcv.NO_WEIGHTS:
        if not os.path.isfile(cfg.weights):
            raise FileNotFoundError(
                f"weights file {cfg.weights} not found: give a local .weights.h5 file"
            )
        model.load_weights(cfg.weights)
    return model


def input_normalisation(model: keras.Model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the [0, 1] RGB tiles that the net's ``normalize`` layer applies."""
    config = model.get_layer("normalize").get_config()
    return (
        tuple(float(v) for v in config["mean"]),
        tuple(float(np.sqrt(v)) for v in config["variance"]),
    )


def num_classes_of(model: keras.Model) -> int:
    """Number of logits of a contract net."""
    return (
        int(model.output["logits"].shape[-1])
        if isinstance(model.output, dict)
        else int(model.output.shape[-1])
    )


def _mentions_keras_cv(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            config = z.read("config.json")
        return b'"module": "keras_cv.' in config or b'"keras_cv>' in config
    except (KeyError, OSError, zipfile.BadZipFile):
        return False  # load_model names what is wrong with the file


def load_model(path: str, expected_num_classes: int | None = None) -> keras.Model:
    """Loads a saved net (``.keras``) with ``safe_mode=True`` and checks it fits the task.

    Args:
      path: a ``.keras`` file written by ``model.save``.
      expected_num_classes: when given, the net must output this many logits.

    Returns:
      The loaded ``keras.Model``.

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a ``.keras`` file, a damaged one, one holding Python code (refused by
        Keras safe_mode), not a kd_histo net, wrong class count, input not 3-channel RGB, or
        NaN/inf weights.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path} not found: train it first or fix the path")
    if not path.endswith(".keras"):
        raise ValueError(f"{path} is not a .keras file; save nets with model.save('<name>.keras')")
    if not zipfile.is_zipfile(path):  # Keras would call it "File not found"
        raise ValueError(
            f"{path} is damaged or not a Keras model (a .keras file is a zip archive); "
            "give a model.keras written by kd-histo-train"
        )
    if _mentions_keras_cv(path):
        import keras_cv  # noqa: F401  (registers keras-cv's layers of a keras_cv:NAME backbone)
    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except Exception as e:  # Keras reports a bad file as ValueError, KeyError, OSError...
        reason = str(e).strip().strip("'\"").splitlines()[0] if str(e).strip() else type(e).__name__
        if "safe_mode" in reason:
            raise ValueError(
                f"{path}: refused, it holds Python code that Keras safe_mode will not run "
                f"({reason.split('. ')[0]}); kd_histo nets hold none: rebuild it with "
                "kd_histo.models"
            ) from None
        raise ValueError(
            f"{path} is not a loadable Keras model ({type(e).__name__}: {reason}); "
            "give a model.keras written by kd-histo-train"
        ) from None
    channels = model.inputs[0].shape[-1] if getattr(model, "inputs", None) else None
    if channels != 3:
        raise ValueError(
            f"{path}: the net takes {channels}-channel input, kd_histo feeds RGB (3 channels)"
        )
    try:
        outputs = model.output
    except (AttributeError, ValueError):  # e.g. a Sequential model that was never called
        outputs = None
    if not isinstance(outputs, dict) or set(outputs) != {"logits", "features"}:
        raise ValueError(
            f"{path}: not a kd_histo net (outputs must be a dict of 'logits' and 'features')"
        )
    n = num_classes_of(model)
    if expected_num_classes is not None and n != expected_num_classes:
        raise ValueError(
            f"{path}: the net has {n} classes but the data set has {expected_num_classes}; "
            "use a model trained on the same class list"
        )
    bad = sum(1 for w in model.weights if not np.isfinite(keras.ops.convert_to_numpy(w)).all())
    if bad:  # a diverged training's network: every output NaN, every "prediction" one class
        raise ValueError(
            f"{path}: refused, {bad} of its {len(model.weights)} weight tensors hold NaN/inf (the "
            "training diverged); retrain it with a lower --learning_rate"
        )
    return with_fast_layers(model)


# Keras layers that kd_histo's nets build as faster twins of the same config and weights
# (resnet_gn.Conv2D, resnet_gn.GroupNormalization, normalize.Normalization).
_TWINS = {
    layers.Conv2D: Conv2D,
    layers.GroupNormalization: GroupNormalization,
    layers.Normalization: Normalization,
}


def with_fast_layers(model: keras.Model) -> keras.Model:
    """``model`` with each Keras layer of ``_TWINS`` replaced by its twin (a net saved before the
    twins existed runs as fast as a new one); the model itself where none is, or where it nests
    other models (a keras-cv backbone: left as built)."""
    if any(isinstance(la, keras.Model) for la in model.layers) or not any(
        type(la) in _TWINS for la in model.layers
    ):
        return model
    fast = keras.models.clone_model(
        model, clone_function=lambda la: _TWINS.get(type(la), type(la)).from_config(la.get_config())
    )
    fast.set_weights(model.get_weights())
    return fast


__all__ = [
    "ARCHS",
    "ModelConfig",
    "NetConfig",
    "build_model",
    "build_from_config",
    "input_normalisation",
    "load_model",
    "num_classes_of",
]
