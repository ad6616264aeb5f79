"""One check shared by the config dataclasses: every number they hold is finite.

``float("nan")`` and ``float("inf")`` pass every range check written as ``x <= 0`` or ``x < 1``
(comparisons with NaN are false), so a NaN learning rate trained an epoch of NaN losses before
anything complained. ``require_finite`` refuses them up front, naming the field.

Not here: the range checks of each field (each dataclass's ``__post_init__``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


def _non_finite(value: Any, name: str):
    """(name, value) of the first non-finite float in ``value`` (tuples and nested dataclasses)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (name, value)
    if isinstance(value, (tuple, list)):
        for v in value:
            bad = _non_finite(v, name)
            if bad:
                return bad
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            bad = _non_finite(getattr(value, f.name), f.name)
            if bad:
                return bad
    return None


def require_finite(config: Any) -> None:
    """Raises ``ValueError`` naming the first NaN or infinite number in a config dataclass.

    Floats are checked in the dataclass's fields, in tuples or lists of them and in nested
    dataclasses.
    """
    bad = _non_finite(config, type(config).__name__)
    if bad:
        name, value = bad
        raise ValueError(f"{name} must be a finite number, got {value}")
