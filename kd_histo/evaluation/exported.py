"""Running a model written by ``kd-histo-export`` (SavedModel or TFLite) on uint8 tiles.

:class:`ExportedModel` reads the folder's ``export.json`` and ``run.json`` and runs a signature on
uint8 tiles: a SavedModel through ``tf.saved_model.load`` (any batch size), a TFLite model through
``tf.lite.Interpreter``, whose default op resolver applies TensorFlow Lite's XNNPACK delegate on
CPU (TF 2.x); the graph's batch size is fixed (``export.json``), so a short last batch is padded
and cut. :meth:`ExportedModel.xnnpack_delegated` says whether the delegate took the graph (a
``DELEGATE`` node in its execution plan; it refuses graphs with dynamic-sized tensors).

kd-histo-predict runs it through the methods it also has for a Keras net (:meth:`classify` on
tiles read at the model's own resolution, :meth:`hr_probs` on HR tiles); an exported model has no
pooled features, so no out-of-domain score.

Not here: writing the export (``kd_histo.evaluation.export``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from kd_histo.evaluation.export import (
    HR_SIGNATURE,
    INPUT_NAME,
    LR_SIGNATURE,
    OUTPUT_NAME,
    ExportRecord,
    read_export_record,
)
from kd_histo.training.run_record import RunRecord, read_run_record


class ExportedModel:
    """An exported model, loaded.

    Args:
      folder: a folder written by kd-histo-export.
      num_threads: TFLite: interpreter threads (None = TFLite's default).
    """

    def __init__(self, folder: str, num_threads: int | None = None):
        self.folder = folder
        self.record: ExportRecord = read_export_record(folder)
        self.run: RunRecord = read_run_record(folder)
        if tuple(self.record.class_names) != tuple(self.run.class_names):
            raise ValueError(
                f"{folder}: export.json and run.json name different classes; export the run again"
            )
        self._runners = {}
        if self.record.format == "savedmodel":
            import tensorflow as tf

            loaded = tf.saved_model.load(folder)
            self._loaded = loaded  # keeps the signatures' variables alive
            for c in self.record.inputs:
                self._runners[c.signature] = loaded.signatures[c.signature]
        else:
            import tensorflow as tf

            path = os.path.join(folder, self.record.model)
            self._interpreter = tf.lite.Interpreter(model_path=path, num_threads=num_threads)
            # The default delegates (XNNPACK) are applied here, at the interpreter's first
            # allocation: a signature runner alone allocates its subgraph without them.
            self._interpreter.allocate_tensors()
            for c in self.record.inputs:
                self._runners[c.signature] = self._interpreter.get_signature_runner(c.signature)

    @property
    def hr_signature(self) -> str:
        """The signature that takes HR tiles: "hr", or the own one of an HR-view (teacher) run."""
        return HR_SIGNATURE if HR_SIGNATURE in self._runners else LR_SIGNATURE

    def probabilities(self, tiles: np.ndarray, signature: str = LR_SIGNATURE) -> np.ndarray:
        """Class probabilities [N, C] float32 of uint8 tiles [N, px, px, 3] (the signature's px)."""
        contract = self.record.contract(signature)
        tiles = np.asarray(tiles)
        if tiles.dtype != np.uint8 or tiles.shape[1:] != (contract.px, contract.px, 3):
            raise ValueError(
                f"{self.folder} ({signature}) takes uint8 tiles of {contract.px}x{contract.px}x3, "
                f"got {tiles.dtype} {tiles.shape[1:]}"
            )
        run = self._runners[signature]
        if self.record.batch_size is None:
            import tensorflow as tf

            return run(**{INPUT_NAME: tf.constant(tiles)})[OUTPUT_NAME].numpy()
        b = self.record.batch_size
        out = []
        for start in range(0, len(tiles), b):
            chunk = tiles[start : start + b]
            padded = np.concatenate([chunk, np.zeros((b - len(chunk), *chunk.shape[1:]), np.uint8)])
            out.append(run(**{INPUT_NAME: padded})[OUTPUT_NAME][: len(chunk)])
        if not out:
            return np.zeros((0, len(self.record.class_names)), np.float32)
        return np.concatenate(out).astype(np.float32)

    def xnnpack_delegated(self) -> bool:
        """TFLite: whether the XNNPACK delegate took the interpreter's primary subgraph (run a
        batch first: the default delegate is applied when the tensors are first allocated)."""
        if self.record.format != "tflite":
            return False
        return any(op["op_name"] == "DELEGATE" for op in self._interpreter._get_ops_details())

    # -- what kd-histo-predict calls (as it does on a Keras net) -----------------------------
    def classify(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, an empty embedding) of tiles read at the model's own resolution."""
        return self.probabilities(batch, LR_SIGNATURE), np.zeros((len(batch), 0), np.float32)

    def hr_probs(self, images: Iterator[np.ndarray], batch_size: int) -> tuple[np.ndarray, None]:
        """(probabilities, None) of HR tiles in memory (uint8 [hr_px, hr_px, 3] each)."""
        out = []
        batch: list[np.ndarray] = []
        for im in images:
            batch.append(im)
            if len(batch) == batch_size:
                out.append(self.probabilities(np.stack(batch), self.hr_signature))
                batch = []
        if batch:
            out.append(self.probabilities(np.stack(batch), self.hr_signature))
        if not out:
            return np.zeros((0, len(self.record.class_names)), np.float32), None
        return np.concatenate(out), None

    def hr_probs_of_float(self, hr) -> np.ndarray:
        """Probabilities of a batch of HR views in [0, 1] (a data pipeline's "hr"), as uint8."""
        tiles = np.round(np.asarray(hr) * 255).astype(np.uint8)  # the decoded pixels exactly
        return self.probabilities(tiles, self.hr_signature)


def load_network(model_dir: str, model: str = ""):
    """(network, run record) that kd-histo-predict runs: ``model_dir``'s Keras net, or the
    exported ``model`` folder when given."""
    if model:
        exported = ExportedModel(model)
        return exported, exported.run
    from kd_histo.models import load_model

    run = read_run_record(model_dir)
    return load_model(run.model_path(model_dir), expected_num_classes=run.num_classes), run
