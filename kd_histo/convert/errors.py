"""The one error type of the conversion tool: a bad input or flag, stated in one line.

A :class:`ConversionError` message says what is wrong *and what to change*; the binary prints it
as ``kd-histo-convert: error: <message>`` and exits non-zero instead of showing a traceback.
Per-file problems (unreadable, truncated, unsupported images) are not errors: they are skipped and
reported in ``dataset.json`` unless ``strict`` is set.
"""

from __future__ import annotations


class ConversionError(ValueError):
    """A conversion cannot go on; the message says what to fix."""


class SkipInput(Exception):
    """One input file cannot be read; it is skipped and listed with this reason."""
