"""Stain normalisation (Reinhard 2001, Macenko 2009) as TensorFlow ops, and the fit of a reference.

A tile from another lab or scanner is re-coloured towards a reference before the net sees it:

- **Reinhard** (Reinhard et al., "Color transfer between images", 2001): the tile goes to the
  paper's decorrelated l-alpha-beta space (RGB -> LMS cone space -> log10 -> a fixed rotation);
  each channel's mean and standard deviation over the tile's stained pixels are moved to the
  reference's, and the result goes back to RGB.
- **Macenko** (Macenko et al., "A method for normalizing histology slides for quantitative
  analysis", ISBI 2009): optical density (OD) of the stained pixels, its plane of the two largest
  singular vectors, the stain vectors at the 1st and 99th percentile of the angle in that plane,
  each pixel's stain concentrations by least squares, their 99th percentiles scaled to the
  reference's, and the reference's stain vectors to mix back to RGB.

Background does not disturb either fit: statistics are taken only over stained pixels (Macenko's
rule: optical density at least ``beta`` in every channel; Reinhard: at least ``beta`` in some
channel, since pale eosin is light in red), and Reinhard leaves background pixels as they are. A
tile with fewer than ``MIN_STAINED`` stained pixels is returned unchanged (there is nothing to
measure). Every op takes one float RGB image in [0, 1], [H, W, 3], runs eagerly and inside
``tf.data`` graphs, and is checked against the NumPy references in
``tests/data/test_stain_norm.py``, written from the papers.

:func:`fit_reference` measures a :class:`StainReference` on many tiles at once (the training
tiles by default); the reference is a small typed record stored in the run record so the run's
model is always fed the same colours.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable

import numpy as np
import tensorflow as tf
from PIL import Image

from kd_histo.settings import setting

METHODS = ("none", "reinhard", "macenko")
BETA = 0.15  # optical-density floor of a stained pixel (Macenko's beta)
ALPHA = 1.0  # percentile of the angle that picks the extreme stain vectors (Macenko's alpha)
MAX_PERCENTILE = 99.0  # percentile of a stain's concentration taken as its maximum
MIN_STAINED = 64  # fewer stained pixels than this: the tile is returned unchanged

# Reinhard et al. (2001): RGB -> LMS, and the l-alpha-beta rotation of log10(LMS).
RGB_TO_LMS = np.array(
    [[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]], np.float64
)
LMS_TO_RGB = np.linalg.inv(RGB_TO_LMS)
LOG_LMS_TO_LAB = np.diag([1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)]) @ np.array(
    [[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]]
)
LAB_TO_LOG_LMS = np.linalg.inv(LOG_LMS_TO_LAB)
_LMS_FLOOR = 1.0 / 255.0  # log10 of a black channel: floored like one grey level


@dataclasses.dataclass(frozen=True)
class StainReference:
    """The colours a run's tiles are normalised to; stored in run.json.

    Attributes:
      method: "reinhard" or "macenko".
      mean: Reinhard: the l-alpha-beta mean of the reference's stained pixels (3 values).
      std: Reinhard: their standard deviation (3 values).
      stain_matrix: Macenko: haematoxylin then eosin optical-density unit vectors (6 values, 2 x 3
        row-major).
      max_concentration: Macenko: the 99th percentile of each stain's concentration (2 values).
      source: what the reference was fitted on (a folder, an image, or "training tiles").
      num_tiles: how many tiles the fit read.
    """

    method: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    stain_matrix: tuple[float, ...] = ()
    max_concentration: tuple[float, ...] = ()
    source: str = ""
    num_tiles: int = 0

    def __post_init__(self):
        expected = {
            "reinhard": ("mean", 3, "std", 3),
            "macenko": ("stain_matrix", 6, "max_concentration", 2),
        }
        if self.method not in expected:
            raise ValueError(
                f"stain reference: unknown method {self.method!r}; one of reinhard, macenko"
            )
        a, na, b, nb = expected[self.method]
        if len(getattr(self, a)) != na or len(getattr(self, b)) != nb:
            raise ValueError(
                f"stain reference ({self.method}): {a} needs {na} values and {b} "
                f"{nb}, got {len(getattr(self, a))} and {len(getattr(self, b))}"
            )
        if not all(map(math.isfinite, getattr(self, a) + getattr(self, b))):
            raise ValueError(f"stain reference ({self.method}): values are not finite")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> StainReference:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"stain reference: unknown fields {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
REFERENCE_TILES = 512  # training tiles a default reference is fitted on (an even spread)


@dataclasses.dataclass(frozen=True)
class StainConfig:
    """Whether and to what a run normalises its tiles' stain (the flags of kd-histo-train).

    The reference is fitted once, when a teacher or baseline starts training, and becomes part of
    the saved network (its first layer, :class:`kd_histo.models.stain.StainNormalization`): the
    evaluation and prediction of that network apply it without being told. A distilled student
    takes its teacher's reference and applies it to its own low-resolution view.

    Attributes:
      method: "none", "reinhard" or "macenko".
      reference: an image or a folder of images to fit the reference on; "" = the run's training
        tiles (up to ``reference_tiles`` of them, spread evenly over the split).
      reference_tiles: how many training tiles the default reference is fitted on.
    """

    method: str = setting(
        "none",
        "Stain normalisation of every tile the net sees: none, reinhard or macenko (fitted on the "
        "training tiles or --stain_reference; saved in the net, so evaluation and prediction "
        "apply it too; a student takes its teacher's).",
        flag="stain_norm",
        choices=METHODS,
    )
    reference: str = setting(
        "",
        "An image or folder of images whose stain is the target of --stain_norm (default the "
        "training tiles).",
        flag="stain_reference",
    )
    reference_tiles: int = REFERENCE_TILES

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(
                f"stain_norm {self.method!r} unknown; choose one of {', '.join(METHODS)}"
            )
        if self.reference and self.method == "none":
            raise ValueError(
                f"--stain_reference={self.reference} needs --stain_norm=reinhard or macenko"
            )
        if self.reference_tiles < 1:
            raise ValueError(f"reference_tiles must be >= 1, got {self.reference_tiles}")


def reference_images(path: str) -> list[str]:
    """The image files of ``--stain_reference``: the file itself, or a folder's images (sorted).

    Raises:
      FileNotFoundError: no such file or folder.
      ValueError: a folder without images, or a file that is no image kd_histo reads.
    """
    if os.path.isdir(path):
        files = sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(path)
            for f in names
            if f.lower().endswith(IMAGE_SUFFIXES)
        )
        if not files:
            raise ValueError(
                f"--stain_reference={path}: the folder holds no images "
                f"({', '.join(IMAGE_SUFFIXES)})"
            )
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--stain_reference={path}: no such image or folder")
    if not path.lower().endswith(IMAGE_SUFFIXES):
        raise ValueError(
            f"--stain_reference={path}: not an image kd_histo reads ({', '.join(IMAGE_SUFFIXES)})"
        )
    return [path]


def fit_reference_on_files(method: str, path: str, max_images: int = REFERENCE_TILES):
    """:func:`fit_reference` on the images of ``path`` (an image or a folder; RGB, 8 bit)."""
    files = reference_images(path)
    files = files[:: max(1, math.ceil(len(files) / max_images))]

    def read():
        for f in files:
            try:
                with Image.open(f) as im:
                    yield np.asarray(im.convert("RGB"))
            except OSError as e:
                raise ValueError(f"--stain_reference: cannot read {f} ({e})") from None

    return fit_reference(method, read(), source=path)


# ---------------------------------------------------------------------------------- shared parts
def optical_density(rgb: tf.Tensor) -> tf.Tensor:
    """-ln(I) per channel, with I floored at one grey level (1/255): white is 0."""
    return -tf.math.log(tf.clip_by_value(tf.cast(rgb, tf.float32), 1.0 / 255.0, 1.0))


def _lower_percentile(values: tf.Tensor, valid: tf.Tensor, q: float) -> tf.Tensor:
    """``np.percentile(values[valid], q, method="lower")`` along axis 0 of [N] or [N, K]."""
    big = tf.constant(np.finfo(np.float32).max, tf.float32)
    mask = valid if values.shape.rank == 1 else valid[:, None]
    ordered = tf.sort(tf.where(mask, values, big), axis=0)
    n = tf.reduce_sum(tf.cast(valid, tf.int32))
    k = tf.cast(tf.floor(q / 100.0 * tf.cast(n - 1, tf.float32)), tf.int32)
    return tf.gather(ordered, tf.maximum(k, 0))


# ---------------------------------------------------------------------------------- Reinhard
def rgb_to_lab(rgb: tf.Tensor) -> tf.Tensor:
    """RGB in [0, 1] -> Reinhard's l-alpha-beta, [..., 3]."""
    lms = tf.tensordot(tf.cast(rgb, tf.float32), tf.constant(RGB_TO_LMS.T, tf.float32), axes=1)
    log_lms = tf.math.log(tf.maximum(lms, _LMS_FLOOR)) / math.log(10.0)
    return tf.tensordot(log_lms, tf.constant(LOG_LMS_TO_LAB.T, tf.float32), axes=1)


def lab_to_rgb(lab: tf.Tensor) -> tf.Tensor:
    """Inverse of :func:`rgb_to_lab`, clipped to [0, 1]."""
    log_lms = tf.tensordot(lab, tf.constant(LAB_TO_LOG_LMS.T, tf.float32), axes=1)
    lms = tf.pow(10.0, log_lms)
    rgb = tf.tensordot(lms, tf.constant(LMS_TO_RGB.T, tf.float32), axes=1)
    return tf.clip_by_value(rgb, 0.0, 1.0)


def reinhard_stained(rgb: tf.Tensor) -> tf.Tensor:
    """[H, W] bool: pixels with optical density at least BETA in some channel (not background)."""
    return tf.reduce_max(optical_density(rgb), axis=-1) >= BETA


def reinhard_stats(pixels: tf.Tensor, stained: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Mean and standard deviation of l-alpha-beta over the stained pixels of [N, 3] RGB."""
    lab = tf.boolean_mask(rgb_to_lab(pixels), stained)
    mean = tf.reduce_mean(lab, axis=0)
    std = tf.sqrt(tf.reduce_mean(tf.square(lab - mean), axis=0))
    return mean, std


def reinhard(image: tf.Tensor, ref: StainReference) -> tf.Tensor:
    """Reinhard normalisation of one [H, W, 3] image in [0, 1] to ``ref``."""
    image = tf.cast(image, tf.float32)
    pixels = tf.reshape(image, [-1, 3])
    stained = reinhard_stained(pixels)

    def normalise():
        mean, std = reinhard_stats(pixels, stained)
        scale = tf.constant(ref.std, tf.float32) / tf.maximum(std, 1e-3)
        lab = (rgb_to_lab(pixels) - mean) * scale + tf.constant(ref.mean, tf.float32)
        out = tf.where(stained[:, None], lab_to_rgb(lab), pixels)
        return tf.reshape(out, tf.shape(image))

    enough = tf.reduce_sum(tf.cast(stained, tf.int32)) >= MIN_STAINED
    return tf.cond(enough, normalise, lambda: image)


# ---------------------------------------------------------------------------------- Macenko
def macenko_stained(od: tf.Tensor) -> tf.Tensor:
    """Macenko's rule: a pixel is kept when its optical density is at least BETA everywhere."""
    return tf.reduce_min(od, axis=-1) >= BETA


def macenko_stain_matrix(od: tf.Tensor, stained: tf.Tensor) -> tf.Tensor:
    """[2, 3] haematoxylin and eosin OD unit vectors of [N, 3] optical densities."""
    weights = tf.cast(stained, tf.float32)[:, None]
    n = tf.maximum(tf.reduce_sum(weights), 1.0)
    # Right singular vectors of the stained OD rows = eigenvectors of OD^T OD (uncentred).
    gram = tf.matmul(od * weights, od, transpose_a=True) / n
    _, vectors = tf.linalg.eigh(gram)  # ascending eigenvalues
    plane = vectors[:, 1:][:, ::-1]  # [3, 2]: largest, second largest
    # Orient each singular vector towards positive optical density (its sign is arbitrary).
    plane = plane * tf.where(tf.reduce_sum(plane, axis=0) < 0, -1.0, 1.0)[None, :]
    projected = tf.matmul(od, plane)
    angle = tf.atan2(projected[:, 1], projected[:, 0])
    lo = _lower_percentile(angle, stained, ALPHA)
    hi = _lower_percentile(angle, stained, 100.0 - ALPHA)
    v_lo = tf.linalg.matvec(plane, tf.stack([tf.cos(lo), tf.sin(lo)]))
    v_hi = tf.linalg.matvec(plane, tf.stack([tf.cos(hi), tf.sin(hi)]))
    # Haematoxylin absorbs more red than eosin does: the vector with the larger red OD is H.
    return tf.where(v_lo[0] > v_hi[0], tf.stack([v_lo, v_hi]), tf.stack([v_hi, v_lo]))


def macenko_concentrations(od: tf.Tensor, stain_matrix: tf.Tensor) -> tf.Tensor:
    """Least-squares stain concentrations [N, 2] of [N, 3] optical densities."""
    # od ~= C @ M  =>  C = od @ M^T (M M^T)^-1
    m = tf.cast(stain_matrix, tf.float32)
    return tf.matmul(
        od, tf.matmul(m, tf.linalg.inv(tf.matmul(m, m, transpose_b=True)), transpose_a=True)
    )


def macenko(image: tf.Tensor, ref: StainReference) -> tf.Tensor:
    """Macenko normalisation of one [H, W, 3] image in [0, 1] to ``ref``."""
    image = tf.cast(image, tf.float32)
    od = tf.reshape(optical_density(image), [-1, 3])
    stained = macenko_stained(od)

    def normalise():
        matrix = macenko_stain_matrix(od, stained)
        conc = macenko_concentrations(od, matrix)
        max_conc = _lower_percentile(conc, stained, MAX_PERCENTILE)
        scale = tf.constant(ref.max_concentration, tf.float32) / tf.maximum(max_conc, 1e-6)
        ref_matrix = tf.reshape(tf.constant(ref.stain_matrix, tf.float32), [2, 3])
        out = tf.exp(-tf.matmul(conc * scale, ref_matrix))
        return tf.reshape(tf.clip_by_value(out, 0.0, 1.0), tf.shape(image))

    enough = tf.reduce_sum(tf.cast(stained, tf.int32)) >= MIN_STAINED
    return tf.cond(enough, normalise, lambda: image)


# ---------------------------------------------------------------------------------- use and fit
def normalise(image: tf.Tensor, ref: StainReference | None) -> tf.Tensor:
    """Applies ``ref``'s method to one [H, W, 3] float image in [0, 1]; None leaves it as is."""
    if ref is None:
        return tf.cast(image, tf.float32)
    return {"reinhard": reinhard, "macenko": macenko}[ref.method](image, ref)


def fit_reference(
    method: str, images: Iterable[np.ndarray], source: str = "", max_pixels: int = 2_000_000
) -> StainReference:
    """Measures a reference on many RGB images (uint8 or float in [0, 1]), pooled.

    Pixels are pooled over all images (at most ``max_pixels`` of them, an even stride over each
    image's stained pixels beyond that), and measured exactly as one tile is measured by the ops.

    Raises:
      ValueError: unknown method, no images, or fewer than MIN_STAINED stained pixels in all.
    """
    if method not in ("reinhard", "macenko"):
        raise ValueError(f"stain reference: unknown method {method!r}; one of reinhard, macenko")
    chunks, n_images = [], 0
    for image in images:
        rgb = np.asarray(image)
        rgb = rgb.astype(np.float32) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float32)
        chunks.append(rgb[..., :3].reshape(-1, 3))
        n_images += 1
    if not chunks:
        raise ValueError(f"stain reference: no images to fit on ({source or 'empty input'})")
    pixels = np.concatenate(chunks)
    od = optical_density(pixels)
    stained = (reinhard_stained(pixels) if method == "reinhard" else macenko_stained(od)).numpy()
    keep = np.flatnonzero(stained)
    if keep.size < MIN_STAINED:
        raise ValueError(
            f"stain reference: only {keep.size} stained pixels in {n_images} images "
            f"({source}); is this H&E tissue?"
        )
    keep = keep[:: max(1, math.ceil(keep.size / max_pixels))]
    pixels = tf.constant(pixels[keep])
    every = tf.ones([keep.size], tf.bool)
    if method == "reinhard":
        mean, std = reinhard_stats(pixels, every)
        return StainReference(
            method, mean=_floats(mean), std=_floats(std), source=source, num_tiles=n_images
        )
    od = optical_density(pixels)
    matrix = macenko_stain_matrix(od, every)
    max_conc = _lower_percentile(macenko_concentrations(od, matrix), every, MAX_PERCENTILE)
    return StainReference(
        method,
        stain_matrix=_floats(matrix),
        max_concentration=_floats(max_conc),
        source=source,
        num_tiles=n_images,
    )


def _floats(t: tf.Tensor) -> tuple[float, ...]:
    return tuple(round(float(v), 6) for v in np.asarray(t).reshape(-1))
