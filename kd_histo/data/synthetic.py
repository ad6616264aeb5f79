"""The embedded default data: seeded, synthetic H&E-like tiles. They are NOT real tissue.

Tiles are rendered as haematoxylin and eosin optical densities and turned into RGB with the
Beer-Lambert law and Ruifrok-Johnston stain vectors, so colours look like H&E (pink stroma,
purple nuclei, white gaps). The classes differ in *fine* structure at roughly matched amounts of
stain, so a low-resolution view genuinely loses class information and a student reading 4x-8x
fewer pixels has something to learn from a high-resolution teacher:

- ``lymphocytes``: many small, round, dark nuclei.
- ``tumour``: fewer large, irregular, pale (vesicular) nuclei with coarse chromatin.
- ``stroma``: thin collagen fibres (period ~3 px) at one orientation, few spindle nuclei.
- ``debris``: nuclear dust (many 1-px fragments) over disordered fibres.

Tiles are grouped into synthetic "slides", each with its own stain intensity (a batch effect),
so slide-disjoint splits matter as they do on real data. Everything is a pure function of the
seed. This module renders and writes image folders; it does not write TFRecords (the demo runs
the real conversion tool on the folder, as a user would).
"""

from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image

CLASS_NAMES = ("lymphocytes", "tumour", "stroma", "debris")

# Ruifrok & Johnston (2001) optical-density vectors for haematoxylin and eosin (RGB, unit norm).
_H_VEC = np.array([0.650, 0.704, 0.286], np.float32)
_E_VEC = np.array([0.072, 0.990, 0.105], np.float32)


def _disk_stamp(h_map, cy, cx, ry, rx, angle, value, texture=None):
    """Adds an ellipse of optical density ``value`` to ``h_map`` in place (soft 1-px edge)."""
    size = h_map.shape[0]
    r = int(np.ceil(max(ry, rx))) + 2
    y0, y1 = max(0, int(cy) - r), min(size, int(cy) + r + 1)
    x0, x1 = max(0, int(cx) - r), min(size, int(cx) + r + 1)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = (dx * c + dy * s) / rx, (-dx * s + dy * c) / ry
    rho = np.sqrt(u * u + v * v)
    edge = np.clip((1.0 - rho) * max(ry, rx), 0.0, 1.0)
    if texture is not None:
        edge = edge * texture(rho)
    h_map[y0:y1, x0:x1] += value * edge


def _fibres(size, rng, angle, period, jitter):
    """Thin eosinophilic fibres: a wavy cosine grating at ``angle`` (values in [0, 1])."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    t = xx * np.cos(angle) + yy * np.sin(angle)
    n = -xx * np.sin(angle) + yy * np.cos(angle)
    wobble = jitter * np.sin(2 * np.pi * n / rng.uniform(12, 30) + rng.uniform(0, 2 * np.pi))
    phase = rng.uniform(0, 2 * np.pi)
    return (0.5 + 0.5 * np.cos(2 * np.pi * (t + wobble) / period + phase)) ** 3


def _nuclei(h_map, rng, count, radius, aspect, density, orientation=None, texture=None):
    """Stamps ``count`` nuclei at uniform places: radius r ~ U(``radius``), the other axis
    r * U(``aspect``), angle ``orientation()`` (default U(0, pi)), optical density
    U(``density``). Draws in that order per nucleus (the tiles are a pure function of the seed)."""
    size = h_map.shape[0]
    for _ in range(count):
        r = rng.uniform(*radius)
        cy, cx = rng.uniform(0, size), rng.uniform(0, size)
        rx = r * rng.uniform(*aspect)
        angle = orientation() if orientation else rng.uniform(0, np.pi)
        _disk_stamp(h_map, cy, cx, r, rx, angle, rng.uniform(*density), texture=texture)


def _lymphocytes(h_map, e_map, rng, size: int, area: float) -> None:
    """Dense small round dark nuclei over faint fibres."""
    _nuclei(h_map, rng, rng.poisson(55 * area), (1.6, 2.6), (0.85, 1.1), (0.9, 1.2))
    e_map += 0.15 * _fibres(size, rng, rng.uniform(0, np.pi), rng.uniform(5, 9), 2.0)


def _tumour(h_map, e_map, rng, size: int, area: float) -> None:
    """Few large pale nuclei with a dark rim and coarse chromatin."""
    chromatin = lambda rho: 0.55 + 0.45 * (rho > 0.7)  # noqa: E731 -- pale centre, dark rim
    _nuclei(
        h_map, rng, rng.poisson(9 * area), (4.0, 6.5), (0.6, 0.95), (0.55, 0.8), texture=chromatin
    )
    h_map += 0.25 * (rng.random((size, size)) < 0.04) * (h_map > 0.2)  # coarse chromatin
    e_map += 0.15 * _fibres(size, rng, rng.uniform(0, np.pi), rng.uniform(5, 9), 2.0)


def _stroma(h_map, e_map, rng, size: int, area: float) -> None:
    """Strong parallel eosin fibres with elongated nuclei along them."""
    angle = rng.uniform(0, np.pi)
    e_map += 0.75 * _fibres(size, rng, angle, rng.uniform(2.6, 3.4), rng.uniform(0.5, 1.5))
    along = lambda: angle + rng.normal(0, 0.15)  # noqa: E731 -- spindles follow the fibres
    _nuclei(h_map, rng, rng.poisson(6 * area), (1.2, 1.8), (3.5, 5.0), (0.9, 1.2), along)
    h_map += 0.12  # matches the other classes' mean haematoxylin


def _debris(h_map, e_map, rng, size: int, area: float) -> None:
    """Scattered dark dust over crossing fibres."""
    dust = (rng.random((size, size)) < 0.09).astype(np.float32)
    h_map += dust * rng.uniform(0.9, 1.4, (size, size)).astype(np.float32)
    e_map += 0.35 * _fibres(size, rng, rng.uniform(0, np.pi), rng.uniform(2.6, 3.4), 4.0)
    e_map += 0.35 * _fibres(size, rng, rng.uniform(0, np.pi), rng.uniform(2.6, 3.4), 4.0)


_PAINT = {"lymphocytes": _lymphocytes, "tumour": _tumour, "stroma": _stroma, "debris": _debris}


def render_tile(
    rng: np.random.Generator, label: int, tile_px: int = 64, stain_scale: float = 1.0
) -> np.ndarray:
    """Renders one synthetic H&E-like tile.

    Args:
      rng: the random generator (the caller seeds it; rendering is deterministic given it).
      label: class index into ``CLASS_NAMES``.
      tile_px: side of the square tile in pixels.
      stain_scale: multiplies both stains (per-slide batch effect), around 1.

    Returns:
      uint8 array ``(tile_px, tile_px, 3)``, RGB.
    """
    if not 0 <= label < len(CLASS_NAMES):
        raise ValueError(f"label must be in 0..{len(CLASS_NAMES) - 1}, got {label}")
    size = int(tile_px)
    area = size * size / 4096.0  # densities are given per 64x64 px
    h_map = np.zeros((size, size), np.float32)
    e_map = np.full((size, size), rng.uniform(0.25, 0.45), np.float32)
    e_map += 0.08 * rng.standard_normal((size, size)).astype(np.float32)
    _PAINT[CLASS_NAMES[label]](h_map, e_map, rng, size, area)

    # White gaps (lumina, fat, tears) in every class, so colour alone does not give the class.
    if rng.random() < 0.5:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.1, 0.3) * size
        gap = np.clip((np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - r) / 2.0, 0.0, 1.0)
        h_map *= gap
        e_map *= gap

    h_scale = stain_scale * rng.uniform(0.8, 1.2)
    e_scale = stain_scale * rng.uniform(0.8, 1.2)
    od = (
        np.clip(h_map, 0, None)[..., None] * h_scale * _H_VEC
        + np.clip(e_map, 0, None)[..., None] * e_scale * _E_VEC
    )
    rgb = 255.0 * np.exp(-od) + rng.normal(0.0, 3.0, od.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def generate(n_per_class: int, tile_px: int = 64, seed: int = 0, slides_per_class: int = 4):
    """Renders a labelled set in memory.

    Args:
      n_per_class: tiles per class.
      tile_px: tile side in pixels.
      seed: seed of everything; the same seed gives the same bytes.
      slides_per_class: number of synthetic slides each class is spread over.

    Returns:
      ``(images uint8 [N, tile_px, tile_px, 3], labels int64 [N], slide_ids list[str])``,
      class-major order.
    """
    if n_per_class < 1 or tile_px < 8:
        raise ValueError(f"need n_per_class >= 1 and tile_px >= 8, got {n_per_class}, {tile_px}")
    images, labels, slides = [], [], []
    for label in range(len(CLASS_NAMES)):
        for i in range(n_per_class):
            slide = i % max(1, slides_per_class)
            rng = np.random.default_rng([seed, label, i])
            stain = 0.85 + 0.3 * np.random.default_rng([seed, label, slide, 7]).random()
            images.append(render_tile(rng, label, tile_px, stain))
            labels.append(label)
            slides.append(f"syn-{CLASS_NAMES[label]}-{slide:02d}")
    return np.stack(images), np.asarray(labels, np.int64), slides


def write_tile_folder(
    out_dir: str,
    n_per_class: int,
    tile_px: int = 64,
    seed: int = 0,
    slides_per_class: int = 4,
    n_unlabeled: int = 0,
) -> str:
    """Writes PNG tiles in class subfolders plus ``manifest.csv`` (path,label,slide_id,patient_id).

    Unlabeled tiles (a mix of all classes, from their own slides) go under ``unlabeled/`` with an
    empty label in the manifest. Returns the manifest path. Writing is idempotent for a seed.
    """
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    images, labels, slides = generate(n_per_class, tile_px, seed, slides_per_class)
    for k, (img, lab, sid) in enumerate(zip(images, labels, slides)):
        rel = os.path.join(CLASS_NAMES[lab], f"{sid}_{k:05d}.png")
        rows.append((rel, CLASS_NAMES[lab], sid))
        _write_png(Image, os.path.join(out_dir, rel), img)
    if n_unlabeled:
        rng = np.random.default_rng([seed, 99])
        for k in range(n_unlabeled):
            lab = int(rng.integers(len(CLASS_NAMES)))
            img = render_tile(np.random.default_rng([seed, 1000 + lab, k]), lab, tile_px, 1.0)
            sid = f"syn-unlabeled-{k % max(1, slides_per_class):02d}"
            rel = os.path.join("unlabeled", f"{sid}_{k:05d}.png")
            rows.append((rel, "", sid))
            _write_png(Image, os.path.join(out_dir, rel), img)
    manifest = os.path.join(out_dir, "manifest.csv")
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "slide_id", "patient_id"])
        for rel, lab, sid in rows:
            w.writerow([rel, lab, sid, sid])
    return manifest


def _write_png(image_module, path: str, img: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image_module.fromarray(img).save(path, format="PNG")
