"""Colour shifts that imitate another lab's slides, applied to tiles of a test set (issue 30).

Two shifts, both deterministic pixel-wise functions of a uint8 RGB tile:

- :func:`reinhard_transfer`: the tile's stained pixels moved to another lab's colour statistics
  (Reinhard et al. 2001: mean and standard deviation of each l-alpha-beta channel), e.g. to the
  statistics of the NCT-CRC-HE tiles (another lab and scanner) measured with
  :func:`kd_histo.data.stain_norm.fit_reference_on_files`. The op is stain_norm's Reinhard, the
  one the nets normalise with; here it *makes* the shift.
- :func:`hed_shift`: a fixed scale and offset of each haematoxylin / eosin / DAB concentration
  (``hed * alpha + beta`` in Ruifrok-Johnston HED space, :func:`kd_histo.data.stain.hed_transform`),
  e.g. :data:`HED_STRONG`, beyond the range of the ``paper+hed`` training jitter
  (``alpha`` in [0.95, 1.05], ``beta`` in [-0.05, 0.05]).

:class:`ShiftSpec` names one shift; :func:`apply` applies it to one tile. The tests compare both
with NumPy references (``tests/data/test_shifts.py``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from kd_histo.data import stain, stain_norm

# The strong HED shift of the measurements: haematoxylin x1.4 + 0.06 (bluer), eosin x0.7
# (paler), DAB unchanged; the training jitter stays within x[0.95, 1.05] and +-0.05.
HED_STRONG_ALPHA = (1.4, 0.7, 1.0)
HED_STRONG_BETA = (0.06, 0.0, 0.0)


@dataclasses.dataclass(frozen=True)
class ShiftSpec:
    """One colour shift of test tiles.

    Attributes:
      name: the shifted test set's name ("nct", "hed_strong").
      kind: "reinhard" (to ``reference``'s colour statistics) or "hed" (``alpha``, ``beta``).
      reference: the Reinhard statistics to move the tiles to (kind "reinhard").
      alpha: HED scale per stain (kind "hed").
      beta: HED offset per stain (kind "hed").
    """

    name: str
    kind: str
    reference: stain_norm.StainReference | None = None
    alpha: tuple[float, float, float] = (1.0, 1.0, 1.0)
    beta: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self):
        if self.kind not in ("reinhard", "hed"):
            raise ValueError(f"shift {self.name}: kind {self.kind!r}, not reinhard or hed")
        if self.kind == "reinhard" and (
            self.reference is None or self.reference.method != "reinhard"
        ):
            raise ValueError(f"shift {self.name}: a reinhard shift needs a reinhard reference")
        if len(self.alpha) != 3 or len(self.beta) != 3:
            raise ValueError(f"shift {self.name}: alpha and beta need 3 values (H, E, DAB)")

    def describe(self) -> str:
        """One line for a report."""
        if self.kind == "hed":
            return f"HED concentrations x{list(self.alpha)} + {list(self.beta)} (H, E, DAB)"
        ref = self.reference
        return (
            f"Reinhard transfer to l-alpha-beta mean {list(ref.mean)}, sd {list(ref.std)} "
            f"({ref.source}, {ref.num_tiles} images)"
        )


def hed_strong() -> ShiftSpec:
    """The strong HED shift of the measurements (:data:`HED_STRONG_ALPHA`, ``_BETA``)."""
    return ShiftSpec("hed_strong", "hed", alpha=HED_STRONG_ALPHA, beta=HED_STRONG_BETA)


def nct_like(folder: str) -> ShiftSpec:
    """Reinhard transfer to the colour statistics of the stained pixels of ``folder``'s images."""
    return ShiftSpec(
        "nct", "reinhard", reference=stain_norm.fit_reference_on_files("reinhard", folder)
    )


def _to_uint8(image: tf.Tensor) -> np.ndarray:
    return np.asarray(tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8))


def reinhard_transfer(rgb: np.ndarray, reference: stain_norm.StainReference) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8: the stained pixels moved to ``reference``'s statistics."""
    return _to_uint8(stain_norm.reinhard(tf.constant(rgb, tf.float32) / 255.0, reference))


def hed_shift(rgb: np.ndarray, alpha, beta) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8: HED concentrations scaled by ``alpha`` and offset by ``beta``."""
    return _to_uint8(stain.hed_transform(tf.constant(rgb, tf.float32) / 255.0, alpha, beta))


def apply(spec: ShiftSpec, rgb: np.ndarray) -> np.ndarray:
    """One uint8 RGB tile shifted by ``spec``."""
    if spec.kind == "hed":
        return hed_shift(rgb, spec.alpha, spec.beta)
    return reinhard_transfer(rgb, spec.reference)
