"""Where kd-histo-predict's inputs are: globs, a list file, and folders searched for slides.

Each entry of ``--inputs`` and each line of ``--inputs_file`` is a path, or a glob (``*``, ``?``,
``[...]``, ``**``) expanded here in sorted order, so a quoted glob works as in a shell (a path that
exists is taken as it is, even with glob characters in its name). In the list file, one path per
line: blank lines and lines starting with ``#`` are ignored, and a relative path is relative to
the list file's folder (as in a manifest). A name holding a comma goes in the list file, or in
``--inputs`` in double quotes (``--inputs='"a, b.svs"'``). Every missing path is named in one
line before any work.

A folder is searched (recursively) for slides as well as tiles: a file of a slide type
(``.svs``, ``.ndpi`` ...) is a slide, and so is a ``.tif``/``.tiff`` that is a pyramid (several
resolution levels) or larger than :data:`SLIDE_SIDE_FACTOR` times the run's HR tile in either
side; the other images are tiles (``predict_inputs.folder_tiles`` groups them by folder). A
folder with ``dataset.json`` is converted data.

Not here: reading tiles and slides (``kd_histo.evaluation.predict_inputs``, ``slide_reader``).
"""

from __future__ import annotations

import functools
import glob
import logging
import math
import os
from collections.abc import Iterable, Sequence

from kd_histo.convert.manifest import SLIDE_EXTENSIONS
from kd_histo.convert.tiles import TILE_EXTENSIONS
from kd_histo.training.run_record import RunRecord

_LOG = logging.getLogger(__name__)

# A --read_mpp further than this ratio from the run's µm/px (either way) is said in a warning.
READ_MPP_WARN_RATIO = 1.5
# A .tif larger than this many HR tiles in either side is a slide, not a tile (a tile folder's
# .tif of some other size than the run's HR tile is still resized into one tile, as before).
SLIDE_SIDE_FACTOR = 2
TIFF_EXTENSIONS = (".tif", ".tiff")
INPUTS_HELP = (
    "Tile folders, converted data folders, or whole-slide image files; quoted globs expand "
    "('slides/*.svs'). Folders are searched for slides as well as tiles: a .svs, .ndpi... is a "
    "slide, and so is a .tif that is a pyramid or larger than 2x the run's HR tile in either side."
)
INPUTS_FILE_HELP = (
    "A text file of inputs, one path or glob per line (# comments and blank lines ignored; "
    "relative to the file's folder), e.g. for names holding a comma."
)


def read_list(path: str) -> list[str]:
    """The paths of a list file: one per line, without blank lines and ``#`` comments, relative
    paths joined to the file's folder."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--inputs_file {path} not found; give a text file, one path a line"
        )
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f]
    except UnicodeDecodeError:
        raise ValueError(f"--inputs_file {path} is not UTF-8 text; save it as UTF-8") from None
    folder = os.path.dirname(os.path.abspath(path))
    return [
        os.path.join(folder, line)  # an absolute line stays itself
        for line in lines
        if line and not line.startswith("#")
    ]


def expand(entries: Iterable[str]) -> tuple[list[str], list[str]]:
    """(the paths of ``entries``, globs expanded; the entries that name nothing), order kept and
    each path once."""
    paths: list[str] = []
    missing: list[str] = []
    for entry in entries:
        if os.path.exists(entry):
            found = [entry]
        elif glob.has_magic(entry):
            found = sorted(glob.glob(entry, recursive=True))
        else:
            found = []
        if not found:
            missing.append(entry)
        paths += [p for p in found if p not in paths]
    return paths, missing


def resolve(inputs: Sequence[str], inputs_file: str, hr_px: int) -> list[tuple[str, str]]:
    """(path, kind) of every input, kind "shards", "folder" (its tiles) or "slide"; a folder's
    slides follow it as inputs of their own.

    Raises:
      FileNotFoundError: some entries name nothing (all of them named, in one line).
      ValueError: no inputs, a file that is neither tile folder nor slide, a folder without tiles
        or slides.
    """
    entries = list(inputs) + (read_list(inputs_file) if inputs_file else [])
    if not entries:
        raise ValueError(
            "no inputs; pass --inputs=<tile folder | data folder | slide file>,... or "
            "--inputs_file=<list>"
        )
    paths, missing = expand(entries)
    if missing:
        where = f" (in --inputs_file {inputs_file})" if inputs_file else ""
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise FileNotFoundError(
            f"{len(missing)} input(s) not found{where}: {shown}; give tile folders, converted "
            "data folders, slide files or globs"
        )
    out: list[tuple[str, str]] = []
    for path in paths:
        kind = input_kind(path, hr_px)
        if kind != "folder":
            out.append((path, kind))
            continue
        tiles, slides = search_folder(path, hr_px)
        if not tiles and not slides:
            raise ValueError(
                f"{path} holds no tiles ({', '.join(TILE_EXTENSIONS)}) and no slides "
                f"({', '.join(SLIDE_EXTENSIONS)}, pyramidal .tif)"
            )
        out += [(path, "folder")] if tiles else []
        out += [(s, "slide") for s in slides]
    return _once(out)


def _once(inputs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each file once (a slide given and found in its folder too); two slides of one name, whose
    output files would overwrite each other, refused in one line."""
    out, seen, stems = [], set(), {}
    for path, kind in inputs:
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        out.append((path, kind))
        if kind == "slide":
            stem = os.path.splitext(os.path.basename(path))[0]
            if stem in stems:
                raise ValueError(
                    f"two slides named {stem}: {stems[stem]} and {path} (their output files "
                    "<slide>.geojson ... would overwrite each other); predict them into two "
                    "--out_dir"
                )
            stems[stem] = path
    return out


def input_kind(path: str, hr_px: int) -> str:
    """The kind of an input: "shards" (a folder with dataset.json), "folder" or "slide"; a file
    of another type is refused in one line."""
    if os.path.isdir(path):
        return "shards" if os.path.isfile(os.path.join(path, "dataset.json")) else "folder"
    ext = os.path.splitext(path)[1].lower()
    if ext in SLIDE_EXTENSIONS or ext in TIFF_EXTENSIONS:
        return "slide"  # a .tif given as a file is a slide, whatever its size
    raise ValueError(
        f"{path}: not a folder or a whole-slide image ({', '.join(SLIDE_EXTENSIONS)}, .tif); "
        "give tiles as their folder"
    )


def search_folder(path: str, hr_px: int) -> tuple[list[str], list[str]]:
    """(tile files, slide files) under ``path``, sorted; hidden files and folders passed over."""
    tiles, slides = [], []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            full = os.path.join(root, f)
            ext = os.path.splitext(f)[1].lower()
            if f.startswith("."):
                continue
            if ext in SLIDE_EXTENSIONS or (ext in TIFF_EXTENSIONS and is_slide_tiff(full, hr_px)):
                slides.append(full)
            elif ext in TILE_EXTENSIONS:
                tiles.append(full)
    return tiles, slides


@functools.lru_cache(maxsize=4096)
def is_slide_tiff(path: str, hr_px: int) -> bool:
    """A TIFF is a slide when it is a pyramid (a second image, smaller than the first, or
    SubIFDs) or larger than ``SLIDE_SIDE_FACTOR * hr_px`` in either side. Read from the header
    only; an unreadable file is a tile (reading it as a tile lists it in skipped.csv)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            width, height = img.size
            if max(width, height) > SLIDE_SIDE_FACTOR * hr_px or 330 in img.tag_v2:  # SubIFDs
                return True
            if getattr(img, "n_frames", 1) > 1:
                img.seek(1)
                return img.size[0] < width or img.size[1] < height
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return False
    return False


def tile_mpp(run: RunRecord, read_mpp: float, model_dir: str = "the run") -> float:
    """µm/px at which slides are tiled into HR tiles: ``read_mpp`` if given, else the run's; a
    ``read_mpp`` more than :data:`READ_MPP_WARN_RATIO` from the run's is said in one warning."""
    if read_mpp < 0 or not math.isfinite(read_mpp):
        raise ValueError(f"--read_mpp must be > 0 (or 0 = the run's), got {read_mpp}")
    if read_mpp and run.mpp:
        ratio = max(read_mpp / run.mpp, run.mpp / read_mpp)
        if ratio > READ_MPP_WARN_RATIO:
            side = "below" if read_mpp < run.mpp else "above"
            _LOG.warning(
                f"--read_mpp={read_mpp:g} µm/px is {ratio:.3g}x {side} "
                f"the {run.mpp:g} µm/px {model_dir} was trained at: slide tiles cover "
                f"{(read_mpp / run.mpp) ** 2:.3g}x a training tile's area; drop --read_mpp "
                "unless run.json's µm/px is wrong"
            )
    if read_mpp:
        return read_mpp
    if run.mpp is None:
        raise ValueError(
            "the run's training tiles have no known µm/px (their dataset.json says 0); pass "
            "--read_mpp=<µm/px of the training tiles>"
        )
    return run.mpp
