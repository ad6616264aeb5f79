"""Whole files or none: write under a temporary name beside the target, rename when complete.

``replacing(path)`` yields the temporary path (``<path>.tmp-<pid>``: two processes writing one
file never share a temporary file); when the block ends normally the file is renamed onto
``path``, and when it fails (a full disk, a file size limit, an interrupt) the temporary file is
removed, so a failed run leaves no ``*.tmp-*`` file behind and the previous ``path`` (if any)
intact. Works for local paths and for ``tf.io.gfile`` ones (``gs://...``) alike.

``write_text`` and ``write_json`` are the common cases: a whole text or JSON file.

Not here: what is written (other callers open the temporary path themselves).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator


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
def replacing(path: str, suffix: str = "") -> Iterator[str]:
    """Yields ``path + suffix`` to write (``suffix`` "" = ``.tmp-<pid>``); renames it onto ``path``
    on success, removes it on failure."""
    tmp = path + (suffix or f".tmp-{os.getpid()}")
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


def write_text(path: str, text: str, suffix: str = "") -> None:
    """Writes ``text`` to ``path`` whole or not at all (see :func:`replacing`)."""
    with replacing(path, suffix) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(
    path: str, obj, *, indent: int = 2, sort_keys: bool = True, suffix: str = ""
) -> None:
    """Writes ``obj`` as JSON to ``path`` whole or not at all (see :func:`replacing`)."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys), suffix)
