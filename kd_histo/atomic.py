"""Whole files or none: write under a temporary name beside the target, rename when complete.

``replacing(path)`` yields the temporary path; when the block ends normally the file is renamed
onto ``path``, and when it fails (a full disk, a file size limit, an interrupt) the temporary
file is removed, so a failed run leaves no ``*.tmp`` file behind and the previous ``path`` (if
any) intact. Works for local paths and for ``tf.io.gfile`` ones (``gs://...``) alike.

Not here: what is written (each caller opens the temporary path itself).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


def _is_remote(path: str) -> bool:
    return "://" in path


def _remove(path: str) -> None:
    try:
        if _is_remote(path):
            import tensorflow as tf

            tf.io.gfile.remove(path)
        else:
            os.remove(path)
    except Exception:  # noqa: BLE001 - cleanup must never hide the error that caused it
        pass


@contextlib.contextmanager
def replacing(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """Yields ``path + suffix`` to write; renames it onto ``path`` on success, removes it on failure."""
    tmp = path + suffix
    try:
        yield tmp
        if _is_remote(path):
            import tensorflow as tf

            tf.io.gfile.rename(tmp, path, overwrite=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
