"""kd_histo.convert: tile folders, CSV manifests and whole-slide images -> sharded TFRecords.

Public API: :func:`convert` (one machine), :func:`run_task` + :func:`merge` (many machines),
:class:`ConvertConfig`, :class:`EncodeOptions`, :class:`ConversionError`, :class:`ManifestError`.
The binary is ``kd-histo-convert`` (``kd_histo.cli.convert``).
"""

from kd_histo.convert.config import ConvertConfig
from kd_histo.convert.convert import convert, merge, run_task
from kd_histo.convert.errors import ConversionError
from kd_histo.convert.manifest import ManifestError
from kd_histo.convert.records import EncodeOptions

__all__ = [
    "ConvertConfig",
    "ConversionError",
    "EncodeOptions",
    "ManifestError",
    "convert",
    "merge",
    "run_task",
]
