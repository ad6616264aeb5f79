"""The typed record of a finished run (``run.json``): one writer, one reader.

A :class:`RunRecord` says everything a reader needs to use a trained network correctly: its job
(mode) and input view, the resolution factor and how the LR view was made (``lr_method``), the
HR tile size and the model's input size, the µm/px of the training HR tiles, the class names in
order, the normalisation, and where the network files are. ``kd_histo.training.train`` writes it
with
:func:`write_run_record`; evaluation, cost, prediction and the experiment read it with
:func:`read_run_record` and build their inputs from it, never from a hand-read dict.

A ``run.json`` without ``record_version`` (the untyped file of before the record) is refused in
one line.
Fields this version does not know (a newer kd_histo wrote the file) are refused, not ignored: a
field that changes how inputs are made must never be silently dropped.

Not here: training (``kd_histo.training.train``), what the network computes (``kd_histo.models``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from kd_histo.atomic import write_json
from kd_histo.data.pipeline import PipelineConfig
from kd_histo.data.stain_norm import StainReference
from kd_histo.data.views import LR_METHODS, lr_size
from kd_histo.training.config import MODES
from kd_histo.training.probe_record import LinearProbe

RUN_JSON = "run.json"
CONFIG_JSON = "config.json"
MODEL_FILE = "model.keras"
RECORD_VERSION = 2  # 1 = the untyped run.json of before (no lr_method, mpp, mean, std)
VIEWS = ("hr", "lr")
# Two µm/px closer than this (relative) are one resolution: scanners report the same objective
# magnification with a percent or so of difference (e.g. 0.2498 vs 0.2520).
MPP_REL_TOL = 0.02


class RunRecordError(ValueError):
    """run.json is missing a fact or holds a wrong one; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What a reader needs to use a trained network (``<model_dir>/run.json``).

    Attributes:
      mode: "teacher", "baseline" or "distill".
      view: the network's input view, "hr" (teacher) or "lr".
      factor: resolution factor of the input view; 1.0 for HR views.
      lr_method: how the LR view was made in training ("area", "bicubic", "bilinear",
        "pyramid"); evaluation and prediction make it the same way.
      hr_px: side of the HR tiles the views are made from.
      input_px: side of the network's input (``hr_px`` for HR views, else ``lr_size(hr_px,
      factor)``).
      mpp: µm per pixel of the training HR tiles (``dataset.json``); None when unknown.
      class_names: the classes, in the order of the network's logits.
      mean: per-channel RGB mean of the normalisation (the network's first layer).
      std: per-channel RGB standard deviation of the normalisation.
      arch: the network's architecture name.
      monitor: validation metric that picked the best epoch (None without a val split).
      best: that metric's best value (None without a val split).
      epochs: epochs the run was configured for.
      epochs_run_this_process: epochs the finishing process ran (less after a resume).
      data_dir: the converted data folder of training.
      model: the network file, relative to the run folder (see :meth:`model_path`).
      savedmodel: the SavedModel folder, relative to the run folder.
      diverged_at_epoch: first epoch whose training loss or a val metric was NaN/inf, or None.
      stain_reference: the stain normalisation the net applies in its first layer (None: none);
        a record of what the saved net already does, never applied a second time.
      ood_threshold: the out-of-domain score above which a tile is flagged (the statistics are in
        ``ood.npz`` beside run.json); None for a run without them (no val split, or trained
        before kd_histo measured them).
      linear_probe: an embedding-only teacher's student: its linear head and the teacher's
        linear probe, fit on the labeled train tiles
        (:class:`kd_histo.training.probe_record.LinearProbe`); None for every other run.
      record_version: format version of the record (:data:`RECORD_VERSION`).
    """

    mode: str
    view: str
    factor: float
    lr_method: str
    hr_px: int
    input_px: int
    mpp: float | None
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    arch: str = "resnet_gn"
    monitor: str | None = None
    best: float | None = None
    epochs: int = 0
    epochs_run_this_process: int = 0
    data_dir: str = ""
    model: str = MODEL_FILE
    savedmodel: str = "savedmodel"
    diverged_at_epoch: int | None = None
    stain_reference: StainReference | None = None
    ood_threshold: float | None = None
    linear_probe: LinearProbe | None = None
    record_version: int = RECORD_VERSION

    def __post_init__(self):
        # JSON gives lists and ints; keep the record hashable and typed.
        for name in ("class_names", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.stain_reference, Mapping):
            try:
                ref = StainReference.from_json(dict(self.stain_reference))
            except (TypeError, ValueError) as e:
                raise RunRecordError(f"run.json: stain_reference: {e}") from None
            object.__setattr__(self, "stain_reference", ref)
        if isinstance(self.linear_probe, Mapping):
            try:
                probe = LinearProbe(**self.linear_probe)
            except TypeError as e:
                raise RunRecordError(f"run.json: linear_probe: {e}") from None
            object.__setattr__(self, "linear_probe", probe)
        object.__setattr__(self, "factor", float(self.factor))
        if self.mpp is not None:
            object.__setattr__(self, "mpp", float(self.mpp))
        if self.mode not in MODES:
            raise RunRecordError(f"run.json: mode {self.mode!r} unknown; one of {', '.join(MODES)}")
        if self.view not in VIEWS or (self.view == "hr") != (self.mode == "teacher"):
            raise RunRecordError(
                f"run.json: view {self.view!r} does not fit mode {self.mode!r} "
                "(teacher = hr, baseline and distill = lr)"
            )
        if (
            not math.isfinite(self.factor)
            or self.factor <= 0
            or (self.view == "hr" and self.factor != 1.0)
        ):
            raise RunRecordError(
                f"run.json: factor {self.factor} must be > 0, and 1.0 for an HR view"
            )
        if self.lr_method not in LR_METHODS:
            raise RunRecordError(
                f"run.json: lr_method {self.lr_method!r} unknown; one of {', '.join(LR_METHODS)}"
            )
        if int(self.hr_px) < 1 or int(self.input_px) < 1:
            raise RunRecordError(
                f"run.json: hr_px {self.hr_px} and input_px {self.input_px} must be >= 1"
            )
        fits = self.hr_px if self.view == "hr" else lr_size(int(self.hr_px), self.factor)
        if int(self.input_px) != fits:
            raise RunRecordError(
                f"run.json: input_px {self.input_px} does not fit hr_px {self.hr_px} at factor "
                f"{self.factor:g} (an {self.view.upper()} net reads {fits} px); the file was "
                "edited or damaged: restore it or retrain"
            )
        if self.mpp is not None and not (math.isfinite(self.mpp) and self.mpp > 0):
            raise RunRecordError(
                f"run.json: mpp {self.mpp} must be > 0 µm/px, or null when unknown"
            )
        if not self.class_names or len(set(self.class_names)) != len(self.class_names):
            raise RunRecordError(
                f"run.json: class_names must be non-empty and unique, got {list(self.class_names)}"
            )
        if (
            len(self.mean) != 3
            or len(self.std) != 3
            or not all(math.isfinite(v) for v in self.mean + self.std)
            or min(self.std) <= 0
        ):
            raise RunRecordError(
                f"run.json: mean and std must be 3 finite values each with std > 0, got "
                f"{list(self.mean)}, {list(self.std)}"
            )

    @property
    def input_mpp(self) -> float | None:
        """µm per pixel of the network's input tiles (``mpp * factor``); None if mpp is unknown."""
        return None if self.mpp is None else self.mpp * self.factor

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def model_path(self, model_dir: str) -> str:
        """The network file, resolved inside ``model_dir``.

        Raises:
          RunRecordError: ``model`` is absolute, climbs out with ``..`` or is a symlink (or lies
            under one) that leads out of the run folder.
        """
        return _inside(model_dir, self.model, "model")

    def savedmodel_path(self, model_dir: str) -> str:
        """The SavedModel folder, resolved inside ``model_dir`` (checked as :meth:`model_path`)."""
        return _inside(model_dir, self.savedmodel, "savedmodel")

    def pipeline_config(self, data_dir: str, batch_size: int):
        """The evaluation pipeline that makes this network's input view exactly as training did.

        Returns:
          A :class:`kd_histo.data.pipeline.PipelineConfig` (feed ``batch[self.view]`` to the net).
        """
        return PipelineConfig(
            data_dir=data_dir,
            batch_size=batch_size,
            factor=self.factor,
            hr_px=self.hr_px,
            lr_method=self.lr_method if self.view == "lr" else "area",
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("class_names", "mean", "std"):
            d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunRecord:
        """Inverse of :meth:`to_dict` for this version (:func:`read_run_record` reads old ones)."""
        d = dict(d)
        version = d.get("record_version")
        if not isinstance(version, int) or version > RECORD_VERSION:
            raise RunRecordError(
                f"run.json has record_version {version!r}, this kd_histo reads up to "
                f"{RECORD_VERSION}: upgrade kd_histo to read it"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RunRecordError(
                f"run.json has fields this kd_histo does not know ({', '.join(unknown)}): "
                "a newer kd_histo wrote it; upgrade kd_histo"
            )
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if k not in d]
        if missing:
            raise RunRecordError(
                f"run.json lacks {', '.join(missing)}; retrain, or add them to run.json"
            )
        return cls(**d)


def _inside(model_dir: str, rel: str, what: str) -> str:
    if not isinstance(rel, str) or not rel:
        raise RunRecordError(f"run.json: {what} must be a path inside the run folder, got {rel!r}")
    if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
        raise RunRecordError(
            f"run.json: {what} {rel!r} points outside the run folder {model_dir}; "
            "it must be a path inside it (e.g. model.keras)"
        )
    path = os.path.join(model_dir, rel)
    root = os.path.realpath(model_dir)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise RunRecordError(
            f"run.json: {what} {rel!r} is a link leading outside the run folder {model_dir}; "
            "replace it with the file itself"
        )
    return path


def model_file(path: str) -> str:
    """A network given as its run folder means the folder's ``model.keras``; a file is itself."""
    return os.path.join(path, MODEL_FILE) if os.path.isdir(path) else path


def record_of_model(path: str) -> RunRecord | None:
    """The run record of a network given as its run folder or as its folder's model file; None
    for a file that is not the model its folder's run.json names (a bare ``.keras`` file, a
    checkpoint): nothing says what it was trained on.

    Raises:
      FileNotFoundError, RunRecordError: the folder's run.json or its model entry is bad.
    """
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if not os.path.isfile(os.path.join(folder, RUN_JSON)):
        return None
    record = read_run_record(folder)
    model = record.model_path(folder)
    if not os.path.isdir(path) and os.path.realpath(model) != os.path.realpath(path):
        return None
    return record


def teacher_misfit(teacher: RunRecord, class_names, hr_px: int, mpp: float | None) -> str:
    """What keeps ``teacher`` from scoring HR tiles of ``class_names`` (in that order), ``hr_px``
    and ``mpp`` µm/px; "" when it fits.

    Returns:
      "view" (not an HR run), "classes" (other names or order), "hr_px" (another tile size) or
      "mpp" (another resolution, beyond :data:`MPP_REL_TOL`; unknown on either side is no misfit).
    """
    if teacher.view != "hr":
        return "view"
    if tuple(teacher.class_names) != tuple(class_names):
        return "classes"
    if teacher.hr_px != hr_px:
        return "hr_px"
    if teacher.mpp and mpp and not math.isclose(teacher.mpp, mpp, rel_tol=MPP_REL_TOL):
        return "mpp"
    return ""


def write_run_record(model_dir: str, record: RunRecord) -> str:
    """Writes ``<model_dir>/run.json`` atomically (temporary file, then rename); returns it."""
    path = os.path.join(model_dir, RUN_JSON)
    write_json(path, record.to_dict())
    return path


def read_run_record(model_dir: str) -> RunRecord:
    """The record of a finished run.

    Raises:
      FileNotFoundError: no run.json (not a finished kd-histo-train run folder).
      RunRecordError: run.json is damaged, newer than this kd_histo, or older than the typed record.
    """
    path = os.path.join(model_dir, RUN_JSON)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: --model_dir must be a finished kd-histo-train run folder"
        )
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunRecordError(
            f"{path} is not valid JSON ({e}); retrain into a new --model_dir"
        ) from None
    if not isinstance(d, dict):
        raise RunRecordError(f"{path} is not a JSON object; retrain into a new --model_dir")
    if "record_version" not in d:
        raise RunRecordError(
            f"{path} predates the typed run record (no record_version) and lacks facts its "
            "network needs (lr_method, mean, std, mpp); retrain into a new --model_dir"
        )
    try:
        return RunRecord.from_dict(d)
    except TypeError as e:  # a field of the wrong JSON type
        raise RunRecordError(f"{path}: {e}") from None
    except RunRecordError as e:  # "run.json: ..." names the file read
        message = str(e)
        raise RunRecordError(
            path + message[len(RUN_JSON) :] if message.startswith(RUN_JSON) else message
        ) from None
