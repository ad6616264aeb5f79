"""What kd-histo-predict writes: the tables of every input, and per slide its QuPath files.

``predictions.csv``: one row per tile: ``slide_id, source, x, y`` (level-0 corner),
``tile_px_l0, tile_um`` (the tile's side in level-0 pixels and in µm; empty for tiles that do not
come from a slide), ``pred, pred_name``, ``prob_<class>`` per class and, in a cascade,
``scored_by`` (teacher or student). ``slides.csv``: per slide (folder group, shards input) the tile
count, mean probability and share of tiles per class, and the classes of highest mean and of
majority. ``skipped.csv``: images that could not be read, with the reason.

Per slide (:func:`write_slide_files`): ``<slide>.geojson`` and ``<slide>_probabilities.ome.tif``
(:mod:`kd_histo.evaluation.qupath_out`) and, when asked, ``heatmaps/<slide>*.png``
(:mod:`kd_histo.evaluation.heatmap`). Every file is written atomically.

Not here: reading inputs, running the models (``kd_histo.evaluation.predict``).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Iterator, Sequence

import numpy as np

from kd_histo.atomic import replacing
from kd_histo.evaluation import qupath_out
from kd_histo.evaluation.qupath_out import SlideGrid


@dataclasses.dataclass(frozen=True)
class ScoredGroup:
    """One slide's (folder group's, shards input's) tiles with their probabilities.

    Attributes:
      slide_id: the slide's name (a folder group's, a shards' slide id).
      sources: each tile's source file.
      xy: each tile's level-0 (x, y) corner ((0, 0) for tiles from folders).
      probs: class probabilities [N, C].
      teacher: cascade only: [N] bool, the tiles the teacher scored; None without a cascade.
      grid: slides only: where the tiles lie on the slide.
      ood_scores: [N] out-of-domain scores of the model's embedding (runs with ``ood.npz``).
    """

    slide_id: str
    sources: Sequence[str]
    xy: Sequence[tuple[int, int]]
    probs: np.ndarray
    teacher: np.ndarray | None = None
    grid: SlideGrid | None = None
    ood_scores: np.ndarray | None = None


def _ood_cells(g: ScoredGroup, i: int, threshold: float | None) -> list:
    if threshold is None:
        return []
    if g.ood_scores is None:
        return ["", ""]
    return [f"{g.ood_scores[i]:.4f}", int(g.ood_scores[i] > threshold)]


def tile_header(names: Sequence[str], cascade: bool, ood_threshold: float | None) -> list[str]:
    """predictions.csv's header (module docstring); with a cascade a column says who scored each,
    with out-of-domain statistics the last two are ``ood_score`` and ``ood_flag``."""
    return (
        ["slide_id", "source", "x", "y", "tile_px_l0", "tile_um", "pred", "pred_name"]
        + [f"prob_{c}" for c in names]
        + (["scored_by"] if cascade else [])
        + (["ood_score", "ood_flag"] if ood_threshold is not None else [])
    )


def tile_rows(
    groups: Sequence[ScoredGroup],
    names: Sequence[str],
    cascade: bool,
    ood_threshold: float | None = None,
) -> Iterator[list]:
    """predictions.csv's rows of ``groups`` (``ood_flag`` 1 = above ``ood_threshold``)."""
    for g in groups:
        side = [g.grid.size_l0, f"{g.grid.tile_um:.6g}"] if g.grid else ["", ""]
        for i, p in enumerate(g.probs):
            k = int(np.argmax(p))
            by = ["teacher" if g.teacher is not None and g.teacher[i] else "student"]
            yield (
                [g.slide_id, g.sources[i], g.xy[i][0], g.xy[i][1], *side, k, names[k]]
                + [f"{v:.6f}" for v in p]
                + (by if cascade else [])
                + _ood_cells(g, i, ood_threshold)
            )


def slide_header(names: Sequence[str], ood: bool) -> list[str]:
    """slides.csv's header: per slide, tile count, classes of highest mean and majority, means,
    shares, and with out-of-domain statistics the share of its tiles flagged (``ood_flagged``)."""
    return (
        ["slide_id", "n_tiles", "pred_mean", "pred_majority"]
        + [f"mean_prob_{c}" for c in names]
        + [f"frac_{c}" for c in names]
        + (["ood_flagged"] if ood else [])
    )


def slide_row(
    slide_id: str, probs: np.ndarray, names: Sequence[str], ood_share: float | None | bool
) -> list:
    """slides.csv's row of a slide's tile probabilities [N, C]; ``ood_share``: its flagged share,
    None when its tiles have no scores, False when the table has no such column."""
    mean = probs.mean(0)
    frac = np.bincount(probs.argmax(1), minlength=len(names)) / len(probs)
    ood = [] if ood_share is False else ["" if ood_share is None else f"{ood_share:.4f}"]
    return (
        [slide_id, len(probs), names[int(mean.argmax())], names[int(frac.argmax())]]
        + [f"{v:.6f}" for v in mean]
        + [f"{v:.6f}" for v in frac]
        + ood
    )


def write_skipped(skipped: Sequence[tuple[str, str]], path: str) -> str:
    """skipped.csv: path and reason of each unreadable image."""
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "reason"])
        w.writerows(skipped)
    return path


def write_slide_files(
    g: ScoredGroup,
    names: Sequence[str],
    out_dir: str,
    *,
    object_type: str = "tile",
    heatmap: bool = False,
    heatmap_classes: Sequence[str] = (),
) -> dict[str, str]:
    """A slide's GeoJSON, probability OME-TIFF and (``heatmap``) heatmaps; {name: path}."""
    if g.grid is None:
        raise ValueError(f"{g.slide_id}: tiles without a slide have no place to draw")
    collection = qupath_out.tile_features(
        g.slide_id,
        g.xy,
        g.grid.size_l0,
        g.probs,
        names,
        scored_by_teacher=g.teacher,
        object_type=object_type,
        ood_scores=g.ood_scores,
    )
    paths = {
        f"geojson:{g.slide_id}": qupath_out.write_geojson(
            os.path.join(out_dir, f"{g.slide_id}.geojson"), collection
        ),
        f"probabilities:{g.slide_id}": qupath_out.write_probability_tiff(
            os.path.join(out_dir, f"{g.slide_id}_probabilities.ome.tif"),
            g.grid,
            g.xy,
            g.probs,
            names,
        ),
    }
    if heatmap:
        from kd_histo.evaluation import heatmap as heatmaps

        written = heatmaps.write_heatmaps(
            g.grid,
            g.slide_id,
            g.xy,
            g.probs,
            names,
            os.path.join(out_dir, "heatmaps"),
            heatmap_classes,
        )
        for k, p in enumerate(written):
            paths[
                f"heatmap:{g.slide_id}" + (f":{heatmap_classes[k]}" if heatmap_classes else "")
            ] = p
    return paths


def write_groups_files(
    groups: Sequence[ScoredGroup],
    names: Sequence[str],
    out_dir: str,
    object_type: str,
    heatmap: bool,
    heatmap_classes: Sequence[str],
) -> dict[str, str]:
    """:func:`write_slide_files` of each group that is a slide's; {name: path}."""
    paths = {}
    for g in groups:
        if g.grid is not None:
            paths |= write_slide_files(
                g,
                names,
                out_dir,
                object_type=object_type,
                heatmap=heatmap,
                heatmap_classes=heatmap_classes,
            )
    return paths
