"""A run's network as a deployable model whose graph holds the preprocessing (``kd-histo-export``).

The exported graph takes **uint8 RGB tiles** and returns **class probabilities**; everything
between is the run's own: the uint8 -> [0, 1] conversion of training
(``tf.image.convert_image_dtype``), then the saved network, whose first layers are the run's
stain normalisation (when run.json has one, :class:`kd_histo.models.stain.StainNormalization`)
and mean/std normalisation. Two signatures:

- ``serving_default``: tiles of the network's input size (run.json ``input_px``) as read at its
  µm/px (``mpp * factor``): what a slide reader at the model's own pyramid level gives.
- ``hr`` (students and baselines only): HR tiles (``hr_px``, at the run's ``mpp``), shrunk in the
  graph by the run's factor with the resize of training (:func:`kd_histo.data.views.resize`, with
  the run's ``lr_method``; "pyramid" runs get "area", as kd-histo-predict does on tiles in memory).

Formats: a TensorFlow **SavedModel** (any batch size), or a **TFLite** flatbuffer at a fixed batch
size (``batch_size``: the GroupNorm reshapes of a free batch size make dynamic tensors, which the
XNNPACK delegate refuses; kd-histo-predict pads the last batch). TFLite quantization: none,
float16 (weights) or int8 (weights and activations, calibrated on the run's training tiles, a
float fallback for ops without an int8 kernel). TFLite has no area-resize op: its ``hr`` signature
resizes with :func:`kd_histo.data.views.resize_portable` (average pooling for a whole factor, the
same numbers). The TFLite graph is converted from the network with its variables frozen into
constants (TF 2.16's converter fails on Keras 3 variables: "missing attribute 'value'").

The output folder holds the model (the SavedModel's files, or ``model.tflite``), a copy of the
run's ``run.json``, and ``export.json`` (:class:`ExportRecord`: format, quantization, batch size
and the input contract of each signature), written last, and the folder is renamed into place
whole.

Not here: running an exported model (``kd_histo.evaluation.exported``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from kd_histo.atomic import write_json
from kd_histo.settings import check_choice, setting
from kd_histo.training.run_record import RUN_JSON, RunRecord, read_run_record

_LOG = logging.getLogger(__name__)

FORMATS = ("savedmodel", "tflite")
QUANTIZE = ("none", "float16", "int8")
EXPORT_JSON = "export.json"
TFLITE_FILE = "model.tflite"
INPUT_NAME = "tiles"
OUTPUT_NAME = "probabilities"
HR_SIGNATURE = "hr"
LR_SIGNATURE = "serving_default"
EXPORT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """One export of a run's network.

    Attributes:
      model_dir: run folder (run.json + model.keras).
      out: the folder to write (replaced if it holds an earlier export).
      format: "savedmodel" or "tflite".
      quantize: TFLite only: "none", "float16" or "int8".
      batch_size: TFLite only: the fixed batch size of the graph.
      calibration_tiles: int8: at most this many training tiles measure the activation ranges.
    """

    model_dir: str = setting(help="Run folder of the model (run.json + model.keras).")
    out: str = setting(help="Folder to write the exported model, run.json and export.json into.")
    format: str = setting("savedmodel", "Export format: savedmodel or tflite.", choices=FORMATS)
    quantize: str = setting(
        "none", "TFLite: quantization of the graph (none, float16 or int8).", choices=QUANTIZE
    )
    # The binaries share --batch_size (one default per process): 32, as kd-histo-predict's.
    batch_size: int = setting(32, "Tiles per batch.", flag_default=32)
    calibration_tiles: int = setting(
        256, "int8: at most this many training tiles (the run's data_dir) calibrate the ranges."
    )

    def __post_init__(self):
        check_choice("--format", self.format, FORMATS)
        check_choice("--quantize", self.quantize, QUANTIZE)
        if self.format == "savedmodel" and self.quantize != "none":
            raise ValueError("--quantize applies to --format=tflite; a SavedModel stays float32")
        if self.batch_size < 1 or self.calibration_tiles < 1:
            raise ValueError("--batch_size and --calibration_tiles must be >= 1")


@dataclasses.dataclass(frozen=True)
class InputContract:
    """What one signature of an exported model takes.

    Attributes:
      signature: the signature's name ("serving_default" or "hr"); its input is "tiles".
      px: side of the square tiles.
      mpp: µm/px the tiles are read at; None when the run's training tiles had no known µm/px.
      dtype: "uint8" (RGB, 0-255).
      resize: how the graph shrinks the tiles to the network's input ("" = not at all; e.g.
        "area x8").
    """

    signature: str
    px: int
    mpp: float | None
    dtype: str = "uint8"
    resize: str = ""


@dataclasses.dataclass(frozen=True)
class ExportRecord:
    """``export.json``: what an exported model is and what it takes.

    Attributes:
      format: "savedmodel" or "tflite".
      quantize: "none", "float16" or "int8".
      model: the model inside the folder ("." for a SavedModel, else "model.tflite").
      batch_size: TFLite's fixed batch size; None for a SavedModel (any).
      inputs: the input contract of each signature.
      output: the output name of every signature ("probabilities", float32 [B, classes]).
      class_names: the classes, in the order of the probabilities.
      calibration_tiles: int8: how many training tiles calibrated the ranges; else 0.
      export_version: format version of this record.
    """

    format: str
    quantize: str
    model: str
    batch_size: int | None
    inputs: tuple[InputContract, ...]
    class_names: tuple[str, ...]
    output: str = OUTPUT_NAME
    calibration_tiles: int = 0
    export_version: int = EXPORT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExportRecord:
        d = dict(d)
        if d.get("export_version") != EXPORT_VERSION:
            raise ValueError(f"export_version {d.get('export_version')!r} is not {EXPORT_VERSION}")
        d["inputs"] = tuple(InputContract(**i) for i in d["inputs"])
        d["class_names"] = tuple(d["class_names"])
        return cls(**d)

    def contract(self, signature: str) -> InputContract:
        return next(i for i in self.inputs if i.signature == signature)


def read_export_record(folder: str) -> ExportRecord:
    """``<folder>/export.json``, with one-line errors for a folder that is no export."""
    path = os.path.join(folder, EXPORT_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: --model must be a folder written by kd-histo-export"
        )
    try:
        with open(path) as f:
            return ExportRecord.from_dict(json.load(f))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is damaged ({e}); export the run again") from None


def signatures_of(run: RunRecord) -> tuple[InputContract, ...]:
    """The input contracts of a run's export: its input view, and HR tiles for an LR view."""
    from kd_histo.data.views import memory_method

    own = InputContract(LR_SIGNATURE, run.input_px, run.input_mpp)
    if run.view == "hr":
        return (own,)
    method = f"{memory_method(run.lr_method)} x{run.factor:g}"
    return own, InputContract(HR_SIGNATURE, run.hr_px, run.mpp, resize=method)


def serving_functions(model, run: RunRecord, batch: int | None, portable: bool = False) -> dict:
    """{signature: tf.function of uint8 tiles -> {"probabilities": float32 [B, C]}} of the net.

    Args:
      model: the run's Keras network.
      run: its record.
      batch: the fixed batch size of the inputs, or None for any.
      portable: shrink HR tiles with :func:`kd_histo.data.views.resize_portable` (TFLite) instead
        of :func:`kd_histo.data.views.resize` (the op of training).
    """
    import tensorflow as tf

    from kd_histo.data.views import memory_method, resize, resize_portable

    def probabilities(x):
        logits = model(x, training=False)["logits"]
        return {OUTPUT_NAME: tf.nn.softmax(tf.cast(logits, tf.float32))}

    def spec(px):
        return [tf.TensorSpec([batch, px, px, 3], tf.uint8, name=INPUT_NAME)]

    @tf.function(input_signature=spec(run.input_px))
    def own(tiles):
        return probabilities(tf.image.convert_image_dtype(tiles, tf.float32))

    fns = {LR_SIGNATURE: own}
    if run.view == "lr":
        shrink = resize_portable if portable else resize

        @tf.function(input_signature=spec(run.hr_px))
        def hr(tiles):
            x = tf.image.convert_image_dtype(tiles, tf.float32)
            return probabilities(shrink(x, run.input_px, memory_method(run.lr_method)))

        fns[HR_SIGNATURE] = hr
    return fns


def calibration_tiles(run: RunRecord, n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Up to ``n`` (HR tile, input-view tile) pairs of the run's training split, uint8 [1, ...]:
    the views made as evaluation makes them (centre crop, no augmentation)."""
    from kd_histo.data.pipeline import make_dataset
    from kd_histo.schema import DatasetInfo

    if not run.data_dir or not os.path.isfile(os.path.join(run.data_dir, "dataset.json")):
        raise FileNotFoundError(
            f"--quantize=int8 calibrates on the run's training tiles, but its data_dir "
            f"{run.data_dir or '(none)'} (run.json) is gone; restore it, or export float16"
        )
    if not DatasetInfo.read(run.data_dir).num_examples("train"):
        raise ValueError(f"{run.data_dir} has no train split to calibrate --quantize=int8 on")
    ds = make_dataset(run.pipeline_config(run.data_dir, 1), "train", training=False)
    for b in ds.take(n):
        hr = np.round(b["hr"].numpy() * 255).astype(np.uint8)  # the decoded pixels exactly
        view = np.round(b[run.view].numpy() * 255).astype(np.uint8)
        yield hr, view


def export(cfg: ExportConfig) -> str:
    """Writes the export of ``cfg.model_dir`` to ``cfg.out``; returns ``cfg.out``."""
    from kd_histo.models import load_model

    run = read_run_record(cfg.model_dir)
    model = load_model(run.model_path(cfg.model_dir), expected_num_classes=run.num_classes)
    out = os.path.abspath(cfg.out)
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, EXPORT_JSON)):
        if not os.path.isdir(out) or os.listdir(out):
            raise ValueError(f"{cfg.out} exists and is no kd-histo-export folder; choose --out")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
    try:
        if cfg.format == "savedmodel":
            _save_savedmodel(model, run, tmp)
            n_cal, model_name, batch = 0, ".", None
        else:
            n_cal = _save_tflite(model, run, cfg, os.path.join(tmp, TFLITE_FILE))
            model_name, batch = TFLITE_FILE, cfg.batch_size
        shutil.copyfile(os.path.join(cfg.model_dir, RUN_JSON), os.path.join(tmp, RUN_JSON))
        record = ExportRecord(
            cfg.format,
            cfg.quantize,
            model_name,
            batch,
            signatures_of(run),
            run.class_names,
            calibration_tiles=n_cal,
        )
        write_json(os.path.join(tmp, EXPORT_JSON), record.to_dict())  # the marker, last
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cfg.out


def _save_savedmodel(model, run: RunRecord, path: str) -> None:
    import tensorflow as tf

    fns = serving_functions(model, run, None)
    module = tf.Module()
    module.net = model  # tracked: its variables are saved
    module.__dict__.update(fns)
    sigs = {name: fn.get_concrete_function() for name, fn in fns.items()}
    tf.saved_model.save(module, path, signatures=sigs)


def _frozen_savedmodel(model, run: RunRecord, batch: int, path: str) -> None:
    """The TFLite converter's input: the serving functions with the variables as constants."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    def constant(fn):
        frozen = convert_variables_to_constants_v2(fn.get_concrete_function())

        @tf.function(input_signature=fn.input_signature)
        def call(tiles):
            return {OUTPUT_NAME: tf.nest.flatten(frozen(tiles))[0]}

        return call

    module, sigs = tf.Module(), {}
    for name, fn in serving_functions(model, run, batch, portable=True).items():
        setattr(module, name, constant(fn))
        sigs[name] = getattr(module, name).get_concrete_function()
    tf.saved_model.save(module, path, signatures=sigs)


def _save_tflite(model, run: RunRecord, cfg: ExportConfig, path: str) -> int:
    """Writes the TFLite flatbuffer; returns how many tiles calibrated int8 (0 otherwise)."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as frozen:
        _frozen_savedmodel(model, run, cfg.batch_size, frozen)
        names = [s.signature for s in signatures_of(run)]
        converter = tf.lite.TFLiteConverter.from_saved_model(frozen, signature_keys=names)
        n_cal = 0
        if cfg.quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if cfg.quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if cfg.quantize == "int8":
            pairs = list(calibration_tiles(run, cfg.calibration_tiles))
            n_cal = len(pairs)
            _LOG.info(f"int8: calibrating on {n_cal} training tiles of {run.data_dir}")
            converter.representative_dataset = lambda: _representative(pairs, names, cfg)
        try:
            flatbuffer = converter.convert()
        except Exception as e:  # the converter's own error class; its first line says why
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(
                f"TFLite cannot convert {cfg.model_dir}'s network ({reason}); export "
                "--format=savedmodel instead"
            ) from None
    with open(path, "wb") as f:
        f.write(flatbuffer)
    return n_cal


def _representative(pairs, names, cfg: ExportConfig):
    """The int8 calibration batches of each signature (the graph's fixed batch size)."""
    for start in range(0, len(pairs), cfg.batch_size):
        chunk = pairs[start : start + cfg.batch_size]
        chunk = (chunk * cfg.batch_size)[: cfg.batch_size]  # a short last batch repeats its tiles
        view = np.concatenate([v for _, v in chunk])
        yield LR_SIGNATURE, {INPUT_NAME: view}
        if HR_SIGNATURE in names:
            yield HR_SIGNATURE, {INPUT_NAME: np.concatenate([h for h, _ in chunk])}
