"""Pyramidal JPEG TIFF slides for the benchmarks, made with libvips' command line (``vips``).

The real slide's level 0 is exported once (OpenSlide), optionally mirrored into a 2 x 2 block and
repeated to any size, and written as a tiled pyramidal TIFF as scanners write them: 256 px JPEG
tiles, every level a mean-shrink (box filter) of the one above, resolution in pixels per
centimetre so OpenSlide reports the µm/px. BENCHMARK-ONLY: needs ``vips`` on the PATH
(``apt-get install libvips-tools``); the package itself never calls it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile


def _vips(*args: str) -> None:
    if shutil.which("vips") is None:
        raise SystemExit("benchmarks need libvips' command line: apt-get install -y libvips-tools")
    subprocess.run(["vips", *args], check=True)


def export_level0(slide_path: str, png_path: str) -> tuple[int, int, float]:
    """Writes the slide's level 0 as a PNG; returns (width, height, level-0 µm/px)."""
    from kd_histo.convert import slides

    slide = slides.open_slide(slide_path)
    try:
        mpp = slides.base_mpp_of(slide)
        width, height = slide.dimensions
        slide.read_region((0, 0), 0, (width, height)).convert("RGB").save(png_path)
    finally:
        slide.close()
    return width, height, mpp


def pyramid_tiff(
    slide_path: str,
    out_path: str,
    *,
    mpp: float = 0.0,
    blocks: tuple[int, int] = (0, 0),
    quality: int = 75,
) -> str:
    """A pyramidal JPEG TIFF of a slide's level 0 (kept if ``out_path`` exists).

    Args:
      slide_path: a slide OpenSlide reads (level 0 is exported, so keep it small), or a .png
        (then ``mpp`` is required).
      out_path: the ``.tif`` to write.
      mpp: µm/px to record (0 = the slide's own).
      blocks: (across, down) copies of a 2 x 2 mirrored block of the slide (so seams match);
        (0, 0) = the slide as it is.
      quality: JPEG quality of every level's tiles.
    """
    if os.path.isfile(out_path):
        return out_path
    tmp = tempfile.mkdtemp(prefix="pyramid_", dir=os.path.dirname(os.path.abspath(out_path)))
    try:
        if slide_path.lower().endswith(".png"):  # an image already: its µm/px is ``mpp``
            png, base_mpp = slide_path, mpp
        else:
            png = os.path.join(tmp, "level0.png")
            *_, base_mpp = export_level0(slide_path, png)
        px_per_mm = 1000.0 / (mpp or base_mpp)
        opts = (
            f"[tile,pyramid,compression=jpeg,Q={quality},tile-width=256,tile-height=256,"
            f"xres={px_per_mm},yres={px_per_mm},resunit=cm]"
        )
        part = out_path + ".part.tif"
        if blocks == (0, 0):
            _vips("copy", png, part + opts)
        else:
            h, v, hv, block = (os.path.join(tmp, f"{n}.v") for n in ("h", "v", "hv", "block"))
            _vips("flip", png, h, "horizontal")
            _vips("flip", png, v, "vertical")
            _vips("flip", h, hv, "vertical")
            _vips("arrayjoin", f"{png} {h} {v} {hv}", block, "--across", "2")
            _vips("replicate", block, part + opts, str(blocks[0]), str(blocks[1]))
        os.replace(part, out_path)  # a killed build leaves no half slide behind
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_path
