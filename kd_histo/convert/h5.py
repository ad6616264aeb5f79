"""HDF5 patch collections (e.g. PatchCamelyon's ``*_x.h5`` / ``*_y.h5``) read with tensorflow-io.

tensorflow-io's ``IOTensor.from_hdf5`` reads one patch at a time without loading the file, which
is why it is used here rather than a whole-array read. Each patch becomes an input addressed as
``<file.h5>#<index>``; its pseudo-slide is the patch itself, because such files do not say which
slide a patch came from (a split cannot be slide-disjoint there: say so when reporting results).

This module does not encode or write anything.
"""

from __future__ import annotations

import os
import re

import numpy as np

from kd_histo.convert.errors import ConversionError, SkipInput
from kd_histo.convert.manifest import Entry

_ITEM = re.compile(r"^(?P<path>.+\.(h5|hdf5))#(?P<index>\d+)$", re.IGNORECASE)


def is_h5_item(path: str) -> bool:
    return bool(_ITEM.match(path))


def _dataset(path: str, key: str):
    import tensorflow_io as tfio

    if not os.path.isfile(path):
        raise ConversionError(f"HDF5 file {path} not found; fix --h5_images/--h5_labels")
    io = tfio.IOTensor.from_hdf5(path)
    keys = [k.numpy().decode() for k in io.keys]
    name = key if key.startswith("/") else "/" + key
    if name not in keys:
        raise ConversionError(
            f"{path} has no dataset {name}; it has {keys}: pass --h5_key=<one of them>"
        )
    return io(name)


def list_h5(
    images: str, labels: str = "", images_key: str = "x", labels_key: str = "y"
) -> list[Entry]:
    """One entry per patch of ``images`` (uint8 [N, H, W, 3]), labels from ``labels`` ([N, ...]).

    Raises:
      ConversionError: missing file or dataset, a non-image or non-uint8 array, label count
        mismatch, or a label that is no integer >= 0 (NaN, 0.5, -1), named by file and index.
    """
    x = _dataset(images, images_key)
    shape = [int(d) for d in x.shape]
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise ConversionError(
            f"{images}:{images_key} has shape {shape}; need [N, H, W, 3] image patches"
        )
    dtype = x.dtype.as_numpy_dtype
    if dtype != np.uint8:
        raise ConversionError(
            f"{images}:{images_key} holds {np.dtype(dtype).name} patches; kd-histo-convert reads "
            "uint8 RGB patches (0-255): save them as uint8 (e.g. np.clip(np.round(x), 0, 255))"
        )
    names = [None] * shape[0]
    if labels:
        y = _dataset(labels, labels_key).to_tensor().numpy().reshape(-1)
        if len(y) != shape[0]:
            raise ConversionError(
                f"{labels} has {len(y)} labels for {shape[0]} patches in {images}; "
                "pair the right files"
            )
        names = _label_names(y, f"{labels}:{labels_key}")
    stem = os.path.splitext(os.path.basename(images))[0]
    return [Entry(f"{images}#{i}", names[i], f"{stem}-{i}") for i in range(shape[0])]


def _label_names(y: np.ndarray, where: str) -> list[str]:
    """Class names ("0", "1"...) of HDF5 labels, which must be integers >= 0 (class indices)."""
    values = y.astype(np.float64)
    bad = ~np.isfinite(values) | (values < 0) | (values != np.round(values))
    if bad.any():
        i = int(np.argmax(bad))
        raise ConversionError(
            f"{where}[{i}] is {float(y[i]):g} ({int(bad.sum())} such labels); labels must be "
            "integers >= 0 (class indices): fix the labels file, or leave --h5_labels out for "
            "unlabeled patches"
        )
    return [str(int(v)) for v in values]


class H5Reader:
    """Reads patches by ``<file>#<index>``, keeping each file open for the life of the reader."""

    def __init__(self, key: str = "x"):
        self.key = key
        self._open: dict[str, object] = {}

    def read(self, item_path: str) -> np.ndarray:
        m = _ITEM.match(item_path)
        if not m:
            raise SkipInput(f"not an HDF5 patch address: {item_path}")
        path, index = m["path"], int(m["index"])
        x = self._open.get(path)
        if x is None:
            x = self._open[path] = _dataset(path, self.key)
        patch = x[index].numpy()
        if patch.dtype != np.uint8:
            raise SkipInput(f"patch dtype {patch.dtype}; only uint8 HDF5 patches are supported")
        return np.repeat(patch, 3, axis=-1) if patch.shape[-1] == 1 else patch
