"""Foreign teachers: a Keras model file or a SavedModel trained elsewhere, described by a
``teacher.json`` (issue 28, Deliver 2).

kd_histo's own teachers carry a run.json that says what they were trained on; a model from
elsewhere carries a ``teacher.json`` beside it that says the same (``teacher.json`` in the
SavedModel folder, or in the folder of the ``.keras`` file)::

    {"input_px": 224, "mpp": 0.5,
     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
     "class_names": ["lung_aca", "lung_n", "lung_scc"],
     "logits": "class_scores", "features": "fmap"}

``mean``/``std`` normalise the [0, 1] RGB tiles kd_histo feeds before the model sees them (omit
both for a model that normalises itself: mean 0, std 1). ``logits`` and ``features`` name the
model's outputs (dict keys, or list indices as strings "0", "1"): the class scores in
``class_names`` order, and a [B, h, w, C] feature map (optional: without one the feature loss
must be off). The same teacher/data checks as for kd_histo runs apply
(:func:`kd_histo.training.run_record.teacher_misfit` on :func:`record_of`): class names and order,
tile size (``input_px`` is the HR tile side), µm/px.

An embedding-only teacher (a foundation model without a classifier head) names ``features`` and
no ``logits`` (nor ``class_names``); :func:`load_foreign` then wraps it as a net of one output,
``features`` [B, D] (a map is global-average pooled), for :mod:`kd_histo.training.embedding`.

Not here: keras-cv presets (see the issue).
"""

from __future__ import annotations

import dataclasses
import json
import os

import keras

from kd_histo.training.run_record import RunRecord

TEACHER_JSON = "teacher.json"


class ForeignTeacherError(ValueError):
    """teacher.json is missing a fact or holds a wrong one; the message names the file."""


@dataclasses.dataclass(frozen=True)
class ForeignTeacher:
    """What a ``teacher.json`` states (see the module doc)."""

    input_px: int
    mpp: float | None
    class_names: tuple[str, ...]
    logits: str
    features: str = ""
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)


def teacher_json(path: str) -> str:
    """Where the ``teacher.json`` of a model path lies (in a SavedModel folder, else beside)."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return os.path.join(folder, TEACHER_JSON)


def is_foreign(path: str) -> bool:
    """A teacher path that a ``teacher.json`` describes (and no kd_histo run.json does)."""
    return os.path.isfile(teacher_json(path)) and not os.path.isfile(
        os.path.join(os.path.dirname(teacher_json(path)), "run.json")
    )


def read_teacher_json(path: str) -> ForeignTeacher:
    """Parses and checks the ``teacher.json`` of ``path``; one line naming the file otherwise."""
    where = teacher_json(path)
    try:
        with open(where, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ForeignTeacherError(f"{where}: not readable as JSON ({e})") from None
    fields = {f.name for f in dataclasses.fields(ForeignTeacher)}
    unknown = sorted(set(raw) - fields) if isinstance(raw, dict) else []
    missing = sorted(_required(raw) - set(raw)) if isinstance(raw, dict) else []
    if not isinstance(raw, dict) or unknown or missing:
        wrong = f"unknown {', '.join(unknown)}" if unknown else f"missing {', '.join(missing)}"
        raise ForeignTeacherError(
            f"{where}: needs input_px, mpp, class_names and logits (optional: features, mean, "
            f"std), or for an embedding-only teacher input_px, mpp and features; {wrong}"
        )
    try:
        spec = ForeignTeacher(
            input_px=int(raw["input_px"]),
            mpp=float(raw["mpp"]) if raw["mpp"] is not None else None,
            class_names=tuple(str(c) for c in raw.get("class_names", ())),
            logits=str(raw.get("logits") or ""),
            features=str(raw.get("features") or ""),
            mean=tuple(float(v) for v in raw.get("mean", (0.0, 0.0, 0.0))),
            std=tuple(float(v) for v in raw.get("std", (1.0, 1.0, 1.0))),
        )
    except (TypeError, ValueError) as e:
        raise ForeignTeacherError(f"{where}: a value has the wrong type ({e})") from None
    few = len(spec.class_names) < 2 if spec.logits else bool(spec.class_names)
    if spec.input_px < 1 or few or (spec.mpp is not None and spec.mpp <= 0):
        raise ForeignTeacherError(
            f"{where}: input_px must be >= 1, mpp > 0 (or null) and class_names two or more "
            "(none for an embedding-only teacher, which has no classes)"
        )
    if len(spec.mean) != 3 or len(spec.std) != 3 or min(spec.std) <= 0:
        raise ForeignTeacherError(f"{where}: mean and std must be 3 values each, std > 0")
    return spec


def _required(raw: dict) -> set[str]:
    """The keys a teacher.json must hold: an embedding-only one (features, no logits) has no
    class_names."""
    if raw.get("features") and not raw.get("logits"):
        return {"input_px", "mpp", "features"}
    return {"input_px", "mpp", "class_names", "logits"}


def record_of(spec: ForeignTeacher, class_names=()) -> RunRecord:
    """The run record a kd_histo teacher of these facts would have (for the teacher checks); an
    embedding-only teacher, which has no classes, takes ``class_names`` (the data's)."""
    return RunRecord(
        mode="teacher",
        view="hr",
        factor=1.0,
        lr_method="area",
        hr_px=spec.input_px,
        input_px=spec.input_px,
        mpp=spec.mpp,
        class_names=spec.class_names or tuple(class_names),
        mean=spec.mean,
        std=spec.std,
        arch="foreign",
    )


def _pick(outputs, key: str, what: str, path: str):
    if isinstance(outputs, dict):
        if key in outputs:
            return outputs[key]
        have = ", ".join(sorted(outputs))
    else:
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        if key.isdigit() and int(key) < len(outputs):
            return outputs[int(key)]
        have = ", ".join(str(i) for i in range(len(outputs)))
    raise ForeignTeacherError(
        f"{teacher_json(path)}: {what} {key!r} is not an output of {path} (it has {have})"
    )


def load_foreign(path: str, spec: ForeignTeacher, num_classes: int) -> keras.Model:
    """The foreign model as a frozen kd_histo net (``{"logits", "features"}``, [0, 1] RGB in).

    Without a ``features`` output, ``features`` is a [B, 1, 1, 1] zero map (the feature loss must
    be off; :func:`kd_histo.training.preflight.load_teacher` refuses it otherwise). Without
    ``logits`` (an embedding-only teacher) its one output is ``features``, the [B, D] embedding.
    """
    if os.path.isdir(path):
        inner = keras.layers.TFSMLayer(path, call_endpoint="serve", name="foreign")
    else:
        inner = keras.saving.load_model(path, safe_mode=True)
    inner.trainable = False
    image = keras.Input((None, None, 3), name="image")
    x = keras.layers.Normalization(
        mean=list(spec.mean), variance=[s * s for s in spec.std], name="normalize"
    )(image)
    outputs = inner(x)
    if not spec.logits:
        return _embedding_net(image, _pick(outputs, spec.features, "features", path), path)
    logits = keras.layers.Activation("linear", dtype="float32", name="logits")(
        _pick(outputs, spec.logits, "logits", path)
    )
    if logits.shape[-1] != num_classes:
        raise ForeignTeacherError(
            f"{path}: its logits output has {logits.shape[-1]} classes but teacher.json and the "
            f"data have {num_classes}"
        )
    if spec.features:
        feats = _pick(outputs, spec.features, "features", path)
    else:
        feats = keras.layers.Lambda(lambda t: keras.ops.zeros_like(t[:, :1])[:, None, None, :])(
            logits
        )
    model = keras.Model(image, {"logits": logits, "features": feats}, name="foreign_teacher")
    model.trainable = False
    return model


def _embedding_net(image, features, path: str) -> keras.Model:
    """An embedding-only teacher's net: ``{"features": [B, D] float32}`` (a map pooled)."""
    if len(features.shape) == 4:
        features = keras.layers.GlobalAveragePooling2D(name="pool_embedding")(features)
    elif len(features.shape) != 2:
        raise ForeignTeacherError(
            f"{teacher_json(path)}: features of {path} must be an embedding [B, D] or a map "
            f"[B, h, w, D], got shape {tuple(features.shape)}"
        )
    emb = keras.layers.Activation("linear", dtype="float32", name="embedding")(features)
    model = keras.Model(image, {"features": emb}, name="embedding_teacher")
    model.trainable = False
    return model
