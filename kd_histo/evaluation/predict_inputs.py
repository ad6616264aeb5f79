"""The inputs of kd-histo-predict: tile folders read as groups of tiles, and slides' tiles.

:func:`folder_tiles` groups a folder's tiles (``input_paths.search_folder``: not its slides,
which are inputs of their own) by their parent folder and reads them
lazily at the run's HR size, as conversion does (unreadable images are listed, not fatal).
:class:`Tiles` is one group's tiles, from a folder or a slide, as the model loop consumes them.

Not here: reading slides (``kd_histo.evaluation.slide_reader``), the models
(``kd_histo.evaluation.predict``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator

import numpy as np

from kd_histo.convert.tiles import TILE_EXTENSIONS
from kd_histo.evaluation.input_paths import search_folder
from kd_histo.evaluation.qupath_out import SlideGrid


@dataclasses.dataclass
class Tiles:
    slide_id: str
    sources: list[str]  # folders: filled as the images are read (unreadable ones are skipped)
    xy: list[tuple[int, int]]  # folders: empty (every tile is (0, 0))
    images: Iterator[np.ndarray] | None  # uint8 [hr_px, hr_px, 3], lazily read; None for slides
    grid: SlideGrid | None = None  # slides: where the tiles lie
    reread: Callable[[np.ndarray], Iterator[np.ndarray]] | None = (
        None  # HR tiles by index (the cascade)
    )


def folder_tiles(path: str, hr_px: int, skipped: list[tuple[str, str]]) -> list[Tiles]:
    """Tiles of a folder, grouped by parent folder; unreadable images go to ``skipped`` as read."""
    groups: dict[str, list[str]] = {}
    for f in search_folder(path, hr_px)[0]:  # its slides are inputs of their own
        groups.setdefault(os.path.relpath(os.path.dirname(f), path), []).append(f)
    if not groups:
        raise ValueError(f"{path} holds no tiles ({', '.join(TILE_EXTENSIONS)})")
    out = []
    for group, files in groups.items():
        slide_id = os.path.basename(os.path.normpath(path)) if group == "." else group
        kept: list[str] = []

        def reread(idx, kept=kept):
            return (reread_tile(kept[i], hr_px) for i in idx)

        out.append(Tiles(slide_id, kept, [], read_all(files, hr_px, kept, skipped), reread=reread))
    return out


def read_all(
    files: list[str], hr_px: int, kept: list[str], skipped: list[tuple[str, str]]
) -> Iterator[np.ndarray]:
    """The readable images of ``files`` at ``hr_px``, read as conversion does; others skipped."""
    from kd_histo.convert.errors import SkipInput
    from kd_histo.convert.tiles import fit_tile, read_tile

    for f in files:
        try:
            image = fit_tile(read_tile(f)[0], hr_px, mode="resize")
        except SkipInput as e:
            skipped.append((f, str(e)))
            continue
        kept.append(f)
        yield image


def reread_tile(path: str, hr_px: int) -> np.ndarray:
    """An image read before, again (the cascade's teacher); one line if it changed since."""
    from kd_histo.convert.errors import SkipInput
    from kd_histo.convert.tiles import fit_tile, read_tile

    try:
        return fit_tile(read_tile(path)[0], hr_px, mode="resize")
    except SkipInput as e:
        raise ValueError(f"{path}: {e} (it was readable a moment ago); rerun") from None
