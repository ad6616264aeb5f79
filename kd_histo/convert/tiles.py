"""Reads one tile image file into 8-bit RGB, recording what had to be converted.

Pillow decodes PNG, JPEG, TIFF and BMP; RGBA/LA (composited on white, as a scanner background),
grayscale, palette and 16-bit images become 8-bit RGB with a note saying so. Float images (grey,
or RGB TIFFs through tifffile) follow :func:`float_to_uint8`'s rule: [0, 1] is x 255, [0, 255]
is kept, and a NaN/inf pixel or other values skip the tile with the reason. Images whose pixel
count exceeds a limit are refused before decoding (decompression bombs). TIFFs can optionally be
decoded inside TensorFlow with tensorflow-io (``decoder="tfio"``), the design card's TIFF path.

This module does not crop, resize, encode or write anything (see ``convert.records``), and does not
read whole-slide images (see ``convert.slides``).
"""

from __future__ import annotations

import os
import re
import warnings

import numpy as np
from PIL import Image

from kd_histo.convert.errors import ConversionError, SkipInput

TILE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DEFAULT_MAX_PIXELS = 100_000_000  # 10k x 10k: far above any tile, far below a slide's level 0


def read_tile(
    path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, decoder: str = "pil"
) -> tuple[np.ndarray, list[str]]:
    """Reads an image file as uint8 RGB.

    The header is read first (Pillow), so a decompression bomb is refused and a truncated TIFF is
    caught before any decoder allocates pixels. A file whose content is another format than its
    extension says is read by its content, with a note.

    Args:
      path: the image file.
      max_pixels: images with more pixels are refused (decompression-bomb guard).
      decoder: "pil", or "tfio" to decode TIFF files with tensorflow-io (other types use Pillow).

    Returns:
      ``(rgb uint8 [H, W, 3], notes)``; notes name any conversion (e.g. "16-bit -> 8-bit").

    Raises:
      SkipInput: the file is missing, empty, truncated, unsupported or too large.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in TILE_EXTENSIONS:
        raise SkipInput(
            f"unsupported file type {ext or '(none)'}; use one of {', '.join(TILE_EXTENSIONS)}"
        )
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise SkipInput(f"cannot read: {e.strerror}") from None
    if size == 0:
        raise SkipInput("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:  # reads the header only
                w, h = img.size
                if w * h > max_pixels:
                    raise SkipInput(
                        f"decompression bomb refused: {w}x{h} px > max_pixels={max_pixels}"
                    )
                notes = []
                if img.format not in _FORMATS[ext]:
                    notes.append(f"{ext} file holds {img.format} data (read by its content)")
                if decoder == "tfio" and img.format == "TIFF":
                    _check_tiff_extent(img, size)
                    return _read_tiff_tfio(path), notes
                img.load()
                rgb, mode_notes = to_rgb8(img)
                return rgb, notes + mode_notes
    except SkipInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipInput(f"decompression bomb refused: {e}") from None
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as e:
        # Pillow signals truncation and unknown formats with these types; it cannot open RGB
        # float TIFFs, which tifffile reads.
        if isinstance(e, Image.UnidentifiedImageError) and ext in (".tif", ".tiff"):
            read = _read_float_tiff(path, max_pixels)
            if read is not None:
                return read
        raise SkipInput(
            f"unreadable image: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


_FORMATS = {  # extension -> Pillow formats it may hold
    ".png": ("PNG",),
    ".jpg": ("JPEG", "MPO"),
    ".jpeg": ("JPEG", "MPO"),
    ".tif": ("TIFF",),
    ".tiff": ("TIFF",),
    ".bmp": ("BMP",),
}


def _check_tiff_extent(img: Image.Image, size: int) -> None:
    """A TIFF whose strips/tiles reach past the end of the file is truncated (libtiff, under
    tensorflow-io, would fill the missing rows with zeros and only log a warning)."""
    tags = img.tag_v2
    offsets = tags.get(273) or tags.get(324) or ()  # StripOffsets or TileOffsets
    counts = tags.get(279) or tags.get(325) or ()  # StripByteCounts or TileByteCounts
    if isinstance(offsets, int):
        offsets, counts = (offsets,), (counts,)
    end = max((int(o) + int(c) for o, c in zip(offsets, counts)), default=0)
    if end > size:
        raise SkipInput(f"truncated TIFF: its image data end at byte {end}, the file has {size}")


def to_rgb8(img: Image.Image) -> tuple[np.ndarray, list[str]]:
    """Converts a loaded Pillow image to uint8 RGB; returns ``(array, notes)``."""
    mode = img.mode
    notes: list[str] = []
    if mode == "RGB":
        return np.asarray(img, np.uint8), notes
    if mode == "F":
        gray, note = float_to_uint8(np.asarray(img))
        return np.repeat(gray[..., None], 3, axis=2), [f"F grayscale -> 8-bit RGB: {note}"]
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img).astype(np.float64)
        # 16-bit data keep their full range (65535 -> 255)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        notes.append(f"{mode} grayscale -> 8-bit RGB (scaled by 255/{top:g})")
        return np.repeat(gray[..., None], 3, axis=2), notes
    if mode == "P":
        img = img.convert("RGBA")
        notes.append("palette -> RGB (transparency composited on white)")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA"):
        rgba = np.asarray(img.convert("RGBA"), np.float32)
        alpha = rgba[..., 3:] / 255.0
        rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)  # white, like glass without tissue
        if notes == []:
            notes.append(f"{mode} -> RGB (alpha composited on white)")
        return np.round(rgb).astype(np.uint8), notes
    if mode in ("L", "1"):
        notes.append(f"{mode} grayscale -> RGB")
        return np.asarray(img.convert("RGB"), np.uint8), notes
    notes.append(f"{mode} -> RGB")
    return np.asarray(img.convert("RGB"), np.uint8), notes


def float_to_uint8(values: np.ndarray) -> tuple[np.ndarray, str]:
    """Float pixels as uint8, by one rule: an image whose values all lie in [0, 1] holds fractions
    of white (x 255); else values in [0, 255] are 8-bit levels (rounded). Returns (pixels, a note
    saying which).

    Raises:
      SkipInput: a NaN or inf pixel, or values outside [0, 255] (no scale can be trusted).
    """
    finite = np.isfinite(values)
    if not finite.all():
        raise SkipInput(
            f"float image with {int((~finite).sum())} NaN or inf pixel value(s); fix or drop it"
        )
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if lo < 0 or hi > 255:
        raise SkipInput(
            f"float image with values {lo:g}..{hi:g}, outside [0, 1] and [0, 255]; save it as "
            "8-bit, or scale it into [0, 1]"
        )
    scale, note = (255.0, "values in [0, 1] x 255") if hi <= 1 else (1.0, "values in [0, 255]")
    return np.round(values.astype(np.float64) * scale).astype(np.uint8), note


def _read_float_tiff(path: str, max_pixels: int) -> tuple[np.ndarray, list[str]] | None:
    """An RGB (or grey) float TIFF through tifffile and :func:`float_to_uint8`; None for any other
    TIFF (Pillow's error stands)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            if page.dtype is None or page.dtype.kind != "f" or len(page.shape) not in (2, 3):
                return None
            if page.shape[0] * page.shape[1] > max_pixels:
                raise SkipInput(
                    f"decompression bomb refused: {page.shape[1]}x{page.shape[0]} px > "
                    f"max_pixels={max_pixels}"
                )
            values = page.asarray()
    except (tifffile.TiffFileError, OSError, ValueError, IndexError):
        return None
    values = values[..., None] if values.ndim == 2 else values
    if values.shape[-1] not in (1, 3, 4):
        return None
    rgb, note = float_to_uint8(values[..., :3])
    rgb = np.repeat(rgb, 3, axis=2) if rgb.shape[-1] == 1 else rgb
    return np.ascontiguousarray(rgb), [f"float TIFF -> 8-bit RGB: {note}"]


def _read_tiff_tfio(path: str) -> np.ndarray:
    """Decodes a TIFF with tensorflow-io (libtiff, RGBA) and drops alpha (size already checked)."""
    import tensorflow as tf
    import tensorflow_io as tfio

    with open(path, "rb") as f:
        data = f.read()
    try:
        rgba = tfio.experimental.image.decode_tiff(tf.constant(data)).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        raise SkipInput(f"unreadable TIFF (tensorflow-io): {_op_message(e)}") from None
    return np.ascontiguousarray(rgba[..., :3])


def _op_message(e) -> str:
    """A TensorFlow op error's own words, without the op and function names around them."""
    text = e.message.splitlines()[0] if e.message else type(e).__name__
    text = re.sub(r"\{\{[^}]*\}\}", "", text)
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", text).strip()


def fit_tile(rgb: np.ndarray, tile_px: int, mode: str = "crop") -> np.ndarray:
    """Makes a square ``tile_px`` tile: unchanged, centre-cropped, or resized.

    Args:
      rgb: uint8 [H, W, 3].
      tile_px: output side.
      mode: "crop" keeps the pixel size (microns per pixel); "resize" area-resamples the whole
        image (changes microns per pixel).

    Raises:
      ConversionError: the image is smaller than ``tile_px`` (crop) — the fix is a smaller tile_px.
    """
    h, w = rgb.shape[:2]
    if h == tile_px and w == tile_px:
        return rgb
    if mode == "resize":
        return np.asarray(
            Image.fromarray(rgb).resize(
                (tile_px, tile_px), Image.BOX if min(h, w) >= tile_px else Image.BICUBIC
            )
        )
    if h < tile_px or w < tile_px:
        raise ConversionError(
            f"tile_px={tile_px} is larger than an input image ({w}x{h} px); "
            f"pass --tile_px<={min(h, w)} "
            "or --fit=resize"
        )
    top, left = (h - tile_px) // 2, (w - tile_px) // 2
    return rgb[top : top + tile_px, left : left + tile_px]
