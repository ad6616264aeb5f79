"""Progress of the long loops (conversion, teacher cache, evaluation, cascade, prediction): one
definition, used by every binary and library loop that can run longer than a few seconds.

    for b in progress(batches, total=n_tiles, desc="evaluate test", unit="tiles", size=batch_tiles):
        ...
    with progress(total=n_tiles, desc="converting", unit="tiles") as bar:
        bar.update(64)

On a terminal (the stream, stderr by default, ``isatty()``) it is a tqdm bar redrawn in place.
Anywhere else (a Slurm or Kubernetes log, a pipe, a file) it is a plain line, never a
``\\r``: one every :data:`EVERY_S` seconds and one at the end, with count/total, rate and ETA,
logged under ``kd_histo.progress`` at INFO (the binaries show it as ``<prog>: <line>`` on stderr,
``kd_histo.cli.flags_common.log_as``). tqdm alone cannot do that second mode: on a file it still
redraws with ``\\r`` (its ``mininterval`` only spaces the redraws out), so the lines here are this
module's own few lines, formatted with tqdm's own time helpers so both modes read alike.

``KD_HISTO_PROGRESS=0`` in the environment turns both off (:data:`SWITCH`, read at each loop's
start; quiet runs and tests); the loop itself runs as before.

Not here: Keras' per-epoch lines while training (``RunConfig.verbose``, 2 = one line per epoch,
the default; Keras' bar, 1, writes ``\\r`` even into a file).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

_LOG = logging.getLogger(__name__)

SWITCH = "KD_HISTO_PROGRESS"  # "0" in the environment: no progress at all
EVERY_S = 30.0  # not on a terminal: one line every EVERY_S seconds, and one at the end


def enabled() -> bool:
    """Whether progress is shown at all (:data:`SWITCH`)."""
    return os.environ.get(SWITCH, "1").strip() != "0"


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str,
    unit: str = "items",
    size: Callable[[Any], int] | None = None,
    stream: TextIO | None = None,
    show: bool = True,
    leave: bool = True,
) -> Progress:
    """The progress of a loop over ``iterable`` (iterate the result), or of ``total`` units of
    work reported by ``update(n)`` (use it as a context manager or call ``close()``).

    Args:
      iterable: the items; each counts as ``size(item)`` units (1 without ``size``).
      total: units in all (default without ``size``: ``len(iterable)``, if any); None = unknown.
      desc: what is being done ("converting", "evaluate test", a slide's name).
      unit: what is counted ("tiles", "slides").
      size: the units one item holds (a batch's tile count).
      stream: the terminal the bar is drawn on; default ``sys.stderr`` at the call.
      show: False = no progress for this loop (the caller's own switch, e.g. ``--noprogress``).
      leave: False = nothing stays at the end, for a caller that writes its own summary line:
        the terminal bar is cleared and no last line is logged (the timed lines still are).
    """
    if total is None and size is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    stream = stream if stream is not None else sys.stderr
    if not (show and enabled()):
        backend = None
    elif getattr(stream, "isatty", lambda: False)():
        backend = _terminal_bar(total, desc, unit, stream, leave)
    else:
        backend = _Lines(total, desc, unit, leave)
    return Progress(iterable, backend, size)


class Progress:
    """What :func:`progress` returns: iterate it, or ``update(n)`` then ``close()``. The end of
    the iteration, of the ``with`` block or ``close()`` writes the last line (once)."""

    def __init__(self, iterable: Iterable | None, backend, size: Callable[[Any], int] | None):
        self._iterable, self._backend, self._size = iterable, backend, size

    def __iter__(self) -> Iterator:
        if self._iterable is None:
            raise TypeError("progress(total=...) has no items to iterate; call update(n)")
        ended = False
        try:
            for item in self._iterable:
                yield item
                self.update(self._size(item) if self._size is not None else 1)
            ended = True
        finally:
            self.close(ended)

    def update(self, n: int = 1) -> None:
        if self._backend is not None:
            self._backend.update(int(n))

    def close(self, ended: bool = True) -> None:
        """Ends the progress; ``ended`` False (an error, Ctrl-C, a loop left early): no last
        line off a terminal, where the binary's one error line is then the last word."""
        if self._backend is not None:
            backend, self._backend = self._backend, None
            backend.close() if ended else getattr(backend, "abandon", backend.close)()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(ended=kind is None)


@contextlib.contextmanager
def around_bars() -> Iterator[None]:
    """Around a line written to the terminal while bars are drawn there (a binary's note): the
    bars are cleared first and redrawn after, so the line does not land inside a bar."""
    module = sys.modules.get("tqdm")  # no bar was ever drawn without it
    if module is None or not getattr(module.tqdm, "_instances", None):
        yield
        return
    with module.tqdm.external_write_mode(file=sys.stderr):
        yield


def _terminal_bar(total: int | None, desc: str, unit: str, stream: TextIO, leave: bool):
    from tqdm import tqdm

    try:  # a terminal that reports no size (a fresh container's pty) gets 80 x 24, not nothing
        sized = os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        sized = True  # tqdm asks the stream itself
    return tqdm(
        total=total,
        desc=desc,
        unit=f" {unit}",
        file=stream,
        dynamic_ncols=sized,
        ncols=None if sized else 80,
        nrows=None if sized else 24,
        leave=leave,
    )


class _Lines:
    """Plain lines through logging: one every :data:`EVERY_S` seconds, one at the end (none for
    a loop that had nothing to do: a folder of unreadable images)."""

    def __init__(self, total: int | None, desc: str, unit: str, leave: bool = True):
        self.total, self.desc, self.unit, self.n, self.leave = total, desc, unit, 0, leave
        self.start = self.last = time.monotonic()
        self.said = -1  # the count of the last line written

    def update(self, n: int) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= EVERY_S:
            self.last = now
            self._say(now)

    def close(self) -> None:
        # unless the line just written says it already, or there was nothing to do
        if self.leave and self.n and self.said != self.n:
            self._say(time.monotonic())

    def abandon(self) -> None:
        """The loop stopped early: no last line."""

    def _say(self, now: float) -> None:
        self.said = self.n
        _LOG.info(self.line(now))

    def line(self, now: float) -> str:
        """The line, e.g. "<desc>: 640/1635 tiles (39%), 21.3 tiles/s, 00:30 elapsed, ETA 00:46"."""
        from tqdm import tqdm

        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if rate >= 1 or rate == 0:
            speed = f"{rate:.1f} {self.unit}/s"
        else:  # slow items: seconds per item reads better than 0.0 slides/s
            speed = f"{1 / rate:.1f} s per {self.unit.removesuffix('s')}"
        took = f"{speed}, {tqdm.format_interval(elapsed)} elapsed"
        if not self.total:
            return f"{self.desc}: {self.n} {self.unit}, {took}"
        eta = tqdm.format_interval(max(0.0, self.total - self.n) / rate) if rate > 0 else "?"
        pct = 100.0 * self.n / self.total
        return f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.0f}%), {took}, ETA {eta}"
