"""Writes a small tiled, multi-level (pyramidal) TIFF that OpenSlide opens as a generic-tiff slide.

A tiny classic-TIFF writer (uncompressed RGB tiles, one directory per level, resolution in pixels
per centimetre so OpenSlide reports µm/px); it exists so slide tests need no extra dependency.
"""

from __future__ import annotations

import struct

import numpy as np
from PIL import Image

_SHORT, _LONG, _RATIONAL = 3, 4, 5


def tissue_blocks(height: int, width: int, seed: int, glass: int) -> np.ndarray:
    """A ``height`` x ``width`` level 0 of glass (grey ``glass``) tiled with 64 px H&E-like blocks
    (``kd_histo.data.synthetic``), classes cycling along the diagonals."""
    from kd_histo.data import synthetic

    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), glass, np.uint8)
    for y in range(0, height - 63, 64):
        for x in range(0, width - 63, 64):
            img[y : y + 64, x : x + 64] = synthetic.render_tile(rng, (x + y) // 64 % 4, 64)
    return img


def write_pyramid_tiff(
    path: str, level0: np.ndarray, mpp: float, levels: int = 3, tile: int = 64
) -> list[np.ndarray]:
    """Writes ``level0`` (uint8 RGB) and ``levels - 1`` halvings; returns the level images."""
    images = [level0]
    for _ in range(levels - 1):
        h, w = images[-1].shape[:2]
        images.append(np.asarray(Image.fromarray(images[-1]).resize((w // 2, h // 2), Image.BOX)))
    out = bytearray(b"II*\x00\x00\x00\x00\x00")
    prev_next_ptr = 4
    for k, img in enumerate(images):
        h, w = img.shape[:2]
        th, tw = -(-h // tile), -(-w // tile)
        padded = np.zeros((th * tile, tw * tile, 3), np.uint8)
        padded[:h, :w] = img
        offsets, counts = [], []
        for ty in range(th):
            for tx in range(tw):
                offsets.append(len(out))
                data = padded[ty * tile : (ty + 1) * tile, tx * tile : (tx + 1) * tile].tobytes()
                counts.append(len(data))
                out += data
        px_per_cm = 1e4 / (mpp * 2**k)
        extra = bytearray()  # out-of-line values, placed after the directory

        def entries_for(ifd_at: int):
            n_entries = 15
            extra_at = ifd_at + 2 + 12 * n_entries + 4
            extra.clear()

            def put(data: bytes) -> int:
                at = extra_at + len(extra)
                extra.extend(data)
                if len(extra) % 2:
                    extra.append(0)
                return at

            res = struct.pack("<II", int(round(px_per_cm * 1000)), 1000)
            e = [
                (254, _LONG, 1, 1 if k else 0),
                (256, _LONG, 1, w),
                (257, _LONG, 1, h),
                (258, _SHORT, 3, put(struct.pack("<3H", 8, 8, 8))),
                (259, _SHORT, 1, 1),
                (262, _SHORT, 1, 2),
                (277, _SHORT, 1, 3),
                (282, _RATIONAL, 1, put(res)),
                (283, _RATIONAL, 1, put(res)),
                (284, _SHORT, 1, 1),
                (296, _SHORT, 1, 3),
                (322, _SHORT, 1, tile),
                (323, _SHORT, 1, tile),
                (
                    324,
                    _LONG,
                    len(offsets),
                    put(struct.pack(f"<{len(offsets)}I", *offsets))
                    if len(offsets) > 1
                    else offsets[0],
                ),
                (
                    325,
                    _LONG,
                    len(counts),
                    put(struct.pack(f"<{len(counts)}I", *counts)) if len(counts) > 1 else counts[0],
                ),
            ]
            assert len(e) == n_entries
            return e

        if len(out) % 2:
            out.append(0)
        ifd_at = len(out)
        struct.pack_into("<I", out, prev_next_ptr, ifd_at)
        entries = entries_for(ifd_at)
        out += struct.pack("<H", len(entries))
        for tag, typ, count, value in entries:
            if typ == _SHORT and count == 1:
                out += struct.pack("<HHIHH", tag, typ, count, value, 0)
            else:
                out += struct.pack("<HHII", tag, typ, count, value)
        prev_next_ptr = len(out)
        out += b"\x00\x00\x00\x00"
        out += extra
    with open(path, "wb") as f:
        f.write(out)
    return images
