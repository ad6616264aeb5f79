"""Pretrained backbones from keras-cv presets: ``--arch=keras_cv:NAME`` (issue 28, Deliver 2).

NAME is a keras-cv backbone preset: a built-in name (``resnet50_imagenet``, ``resnet18``,
``efficientnetv2_b0_imagenet``...; keras-cv maps it to a Kaggle handle and downloads it), a
``kaggle://`` handle, or a preset folder on disk (``config.json`` + ``model.weights.h5``, as
``keras_cv.models.Backbone.save_to_preset`` writes it), which works offline. The backbone's last
feature map becomes the net's ``features``; :func:`kd_histo.models.build_from_config` adds the
pooled Dense head, so the net keeps the contract of kd_histo's own nets.

Weights (``--weights``): ``none`` (random init), ``imagenet`` (the preset's pretrained weights;
for a name without them, ``NAME_imagenet`` when keras-cv has it), or a path: a preset folder (its
weights file) or a ``.weights.h5`` file of the backbone.

Input: kd_histo feeds [0, 1] RGB. A preset whose backbone rescales its own input
(``include_rescaling``, keras-cv's convention: pixels 0-255 in, ``Rescaling(1/255)`` first) gets
pixels 0-255, i.e. the net's normalisation is mean 0, std 1/255 (:attr:`Backbone.mean` /
``std``, written to run.json): exactly what the preset was trained on. A preset without it states
no normalisation; the net then normalises by the data set's mean/std as kd_histo's own nets do.

The backbone is wrapped as a plain functional model of its layers (``keras_cv_backbone``), so a
saved ``model.keras`` of a ResNet preset reloads without keras-cv; backbones with keras-cv's own
layers need ``import keras_cv`` first (:func:`kd_histo.models.load_model` does it).

Not here: torchvision or timm checkpoints; video or 3-D backbones (refused: no image map);
backbones with Python lambda layers (keras-cv's CSPDarkNet: refused, since kd_histo loads saved
nets with Keras safe_mode, which will not run them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import keras

PREFIX = "keras_cv:"
NO_WEIGHTS = ("", "none")
PRETRAINED = "imagenet"
PIXELS_0_255 = ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))
LAYER_NAME = "keras_cv_backbone"
_LOG = logging.getLogger(__name__)


class KerasCVError(ValueError):
    """A keras-cv preset or weights source that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A keras-cv backbone ready to stack a head on.

    Attributes:
      model: functional model of the backbone's layers, [B, H, W, 3] -> [B, h, w, F].
      mean: per-channel mean the net subtracts from [0, 1] tiles; None = the data set's.
      std: per-channel std the net divides by; None = the data set's.
    """

    model: keras.Model
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None


def is_keras_cv(arch: str) -> bool:
    """``arch`` names a keras-cv preset (``keras_cv:NAME``)."""
    return arch.startswith(PREFIX)


def preset_of(arch: str) -> str:
    """NAME of ``keras_cv:NAME``."""
    return arch[len(PREFIX) :]


def check_arch(arch: str, weights: str) -> None:
    """The syntax of an ``arch``/``weights`` pair (no file access; raises ValueError, one line)."""
    if is_keras_cv(arch) and not preset_of(arch).strip():
        raise ValueError(
            "arch keras_cv: needs a preset, e.g. keras_cv:resnet50_imagenet or keras_cv:<folder>"
        )
    if weights == PRETRAINED and not is_keras_cv(arch):
        raise ValueError(
            f"weights {PRETRAINED} needs a keras-cv backbone (--arch=keras_cv:NAME); kd_histo's "
            f"own {arch} has no pretrained weights (give a .weights.h5 file or none)"
        )


def _presets() -> tuple[dict, dict]:
    """keras-cv's built-in backbone presets: (all, those with weights), name -> metadata."""
    from keras_cv.src.models.backbones import backbone_presets as bp

    return bp.backbone_presets, bp.backbone_presets_with_weights


def resolve(name: str, weights: str) -> str:
    """The preset handle keras-cv loads for NAME: a folder as it is, a built-in name as its
    Kaggle handle (``NAME_imagenet``'s for ``weights=imagenet`` when NAME has no weights), a
    ``kaggle://`` handle as it is. Nothing is read or downloaded here."""
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise KerasCVError(
                f"keras-cv preset folder {name} has no config.json; save one with "
                "keras_cv.models.Backbone.save_to_preset(folder)"
            )
        return name
    if name.startswith("kaggle://"):
        return name
    every, with_weights = _presets()
    if weights == PRETRAINED and name in every and name not in with_weights:
        name = f"{name}_imagenet" if f"{name}_imagenet" in with_weights else name
    if name not in every:
        looks_like_path = os.sep in name or name.startswith(".")
        what = "is not a folder" if looks_like_path else "is no keras-cv backbone preset"
        raise KerasCVError(
            f"keras-cv preset {name} {what}; give a preset folder or one of "
            f"{', '.join(sorted(with_weights)[:6])}, ... (keras_cv.models.Backbone presets)"
        )
    return every[name]["kaggle_handle"]


def _fetch(handle: str, name: str) -> str:
    """Local path of a preset's file: in a folder, or downloaded (keras-cv's own path: kagglehub
    for a Kaggle handle) when online; one line naming the preset otherwise."""
    from keras_cv.src.utils.preset_utils import get_file

    try:
        return get_file(handle, name)
    except Exception as e:  # offline: requests' ConnectionError, kagglehub's HTTP errors...
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise KerasCVError(
            f"keras-cv preset {handle}: {name} could not be downloaded ({type(e).__name__}: "
            f"{first}); offline, give a preset folder: --arch=keras_cv:<folder>"
        ) from None


def _config(handle: str) -> dict:
    try:
        with open(_fetch(handle, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        if isinstance(e, KerasCVError):
            raise
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise KerasCVError(
            f"keras-cv preset {handle}: config.json not readable ({first})"
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        raise KerasCVError(f"keras-cv preset {handle}: config.json is not a keras-cv preset")
    return config


def _weights_file(source: str, handle: str, config: dict) -> str:
    """The weights file ``--weights`` names (downloaded for a Kaggle preset)."""
    if source == PRETRAINED:
        if not config.get("weights"):
            raise KerasCVError(
                f"keras-cv preset {handle} has no pretrained weights; choose a preset with "
                "weights (e.g. resnet50_imagenet) or --weights=none"
            )
        return _fetch(handle, config["weights"])
    if os.path.isdir(source):
        theirs = _config(source).get("weights")
        if not theirs or not os.path.isfile(os.path.join(source, theirs)):
            raise KerasCVError(f"weights folder {source} holds no preset weights file")
        return os.path.join(source, theirs)
    if not os.path.isfile(source):
        raise KerasCVError(
            f"weights {source} not found: give imagenet, none, a keras-cv preset folder or a "
            ".weights.h5 file"
        )
    return source


def load_backbone(arch: str, weights: str = "none") -> Backbone:
    """The backbone of ``arch`` (``keras_cv:NAME``) with ``weights`` (see the module doc).

    Raises:
      KerasCVError: an unknown preset or path, weights that do not fit, a backbone without a
        [B, h, w, F] output (one line naming it).
    """
    import keras_cv

    handle = resolve(preset_of(arch), weights)
    config = _config(handle)
    overrides = {"input_shape": [None, None, 3]} if "input_shape" in config["config"] else {}
    try:
        model = keras_cv.models.Backbone.from_preset(handle, load_weights=False, **overrides)
    except Exception as e:  # keras-cv raises TypeError, ValueError, KeyError... for a bad config
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise KerasCVError(
            f"keras-cv preset {handle} cannot be built ({type(e).__name__}: {first})"
        ) from None
    if weights not in NO_WEIGHTS:
        path = _weights_file(weights, handle, config)
        try:
            model.load_weights(path)
        except (ValueError, KeyError, OSError) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0][:200].rstrip(" :.")
            raise KerasCVError(
                f"weights {path} do not fit keras-cv preset {handle} ({first}); give weights of "
                "the same architecture"
            ) from None
    if any(isinstance(layer, keras.layers.Lambda) for layer in model._flatten_layers()):
        raise KerasCVError(
            f"keras-cv preset {handle} holds Python lambda layers (CSPDarkNet's activations), "
            "which a saved model.keras cannot reload under Keras safe_mode: choose another preset"
        )
    if len(model.output.shape) != 4:
        raise KerasCVError(
            f"keras-cv preset {handle} outputs {model.output.shape}, not a [B, h, w, F] map of "
            "an image: choose an image backbone"
        )
    wrapped = keras.Model(model.inputs, model.output, name=LAYER_NAME)
    if config["config"].get("include_rescaling"):
        _LOG.info(f"keras-cv preset {handle}: tiles go in as pixels 0-255, as the preset expects")
        return Backbone(wrapped, *PIXELS_0_255)
    _LOG.info(
        f"keras-cv preset {handle} states no input normalisation: tiles are normalised by the "
        "data set's mean/std"
    )
    return Backbone(wrapped, None, None)
