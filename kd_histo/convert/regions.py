"""Annotation files matched to slides, and slide tiles labelled by the regions they lie in.

Matching (:func:`match_annotations`): ``--annotations`` is a file, a folder or a glob of
annotation files (``.geojson``, ``.json``, ``.xml``), each matched to the slide of the same stem
(``a.svs`` <-> ``a.geojson``, and QuPath's ``a.svs.geojson``), or a CSV with columns
``slide,annotations`` (slide: a path, file name or stem; annotations: a path, relative to the CSV).
A file that matches no slide is an error; a slide without a file keeps its slide label, if any.

Labelling (:func:`label_tiles`), with ``t = min_annotation_overlap``: per tile, the fraction of
its area inside each class's regions (regions of one class are merged first, so overlapping
drawings of one class are not counted twice).
  - an ignore class (named ``Ignore*`` or listed in ``ignore_classes``) covering >= t: dropped
    ("ignore"), whatever else the tile overlaps;
  - two or more classes covering >= t each (overlapping regions): dropped ("ambiguous");
  - one class covering >= t: that class;
  - otherwise (outside every region, or less than t inside any one class): unannotated, i.e.
    unlabeled, or dropped ("unannotated") with ``unannotated="drop"``.
The areas come from an STRtree over the region polygons (candidate tiles only, so tiles far from
every region cost nothing), a vectorised ``contains_properly`` (tiles wholly inside a region count
fully) and GEOS's rectangle clipping for the tiles that cross a region's boundary.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import hashlib
import os

import numpy as np
import shapely

from kd_histo.convert import slides
from kd_histo.convert.annotations import (
    GEOJSON_SUFFIXES,
    XML_SUFFIXES,
    SlideAnnotations,
    read_annotations,
)
from kd_histo.convert.errors import ConversionError, SkipInput
from kd_histo.schema import UNLABELED

DROPPED = -2  # a tile label meaning "not written" (the reason is counted)
DROP_REASONS = ("ambiguous", "ignore", "unannotated")
ANNOTATION_SUFFIXES = GEOJSON_SUFFIXES + XML_SUFFIXES


def is_ignore_class(name: str, ignore_classes: tuple[str, ...] = ()) -> bool:
    return name.lower().startswith("ignore") or name in ignore_classes


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in ANNOTATION_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def _is_csv(spec: str) -> bool:
    return spec.lower().endswith(".csv") and os.path.isfile(spec)


def annotation_files(spec: str) -> list[str]:
    """The annotation files ``--annotations`` names: a file, the files of a folder, or a glob."""
    if os.path.isdir(spec):
        return sorted(
            p
            for p in glob.glob(os.path.join(spec, "*"))
            if p.lower().endswith(ANNOTATION_SUFFIXES) and os.path.isfile(p)
        )
    return sorted(p for p in glob.glob(spec) if os.path.isfile(p))


def spec_digest(spec: str) -> str:
    """SHA-256 over the names and bytes of the files ``--annotations`` names (a CSV: the CSV and
    the files it lists), so a resumed conversion notices edited annotations ("" when none)."""
    if not spec:
        return ""
    files = annotation_files(spec)
    if _is_csv(spec):
        base = os.path.dirname(spec)
        with open(spec, newline="", encoding="utf-8") as f:
            listed = [row.get("annotations") or "" for row in csv.DictReader(f)]
        files = [spec] + sorted(os.path.normpath(os.path.join(base, p)) for p in listed)
    h = hashlib.sha256()
    for p in files:
        h.update(p.encode("utf-8", "surrogateescape") + b"\0")
        if os.path.isfile(p):
            with open(p, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def match_annotations(spec: str, slide_paths: list[str]) -> dict[str, str]:
    """Slide path -> annotation file, from ``--annotations`` (a file, folder, glob or CSV).

    Raises:
      ConversionError: nothing matches ``spec``, or a file matches no slide (or several).
    """
    if _is_csv(spec):
        return _match_csv(spec, slide_paths)
    files = annotation_files(spec)
    if not files:
        raise ConversionError(
            f"--annotations {spec} matches no .geojson, .json or .xml file; "
            "give a file, a folder, a glob or a CSV slide,annotations"
        )
    by_key: dict[str, list[str]] = collections.defaultdict(list)
    for s in slide_paths:  # "a" for a.svs, and "a.svs" (QuPath names exports by image name)
        by_key[os.path.splitext(os.path.basename(s))[0]].append(s)
        by_key[os.path.basename(s)].append(s)
    out: dict[str, str] = {}
    for f in files:
        found = sorted(set(by_key.get(_stem(f), [])))
        if len(found) != 1:
            what = "no slide" if not found else f"{len(found)} slides ({', '.join(found[:3])})"
            raise ConversionError(
                f"{f}: annotation file matches {what} by file stem; name it after its slide "
                "(a.svs <-> a.geojson) or list the pairs in a CSV slide,annotations"
            )
        if found[0] in out:
            raise ConversionError(
                f"{f}: slide {found[0]} already has annotations {out[found[0]]}; keep one file"
            )
        out[found[0]] = os.path.normpath(f)
    return out


def _match_csv(spec: str, slide_paths: list[str]) -> dict[str, str]:
    keys: dict[str, str] = {}
    for s in slide_paths:
        for k in (
            os.path.normpath(s),
            os.path.basename(s),
            os.path.splitext(os.path.basename(s))[0],
        ):
            keys.setdefault(k, s)
    out: dict[str, str] = {}
    base = os.path.dirname(spec)
    with open(spec, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        if "slide" not in row or "annotations" not in row:
            raise ConversionError(f"{spec}: needs the columns slide,annotations")
        slide = keys.get(os.path.normpath(row["slide"] or "")) or keys.get(row["slide"] or "")
        ann = os.path.normpath(os.path.join(base, row["annotations"] or ""))
        if slide is None:
            raise ConversionError(
                f"{spec}: row {i + 2}: slide {row['slide']!r} is none of the --slides; "
                "fix the name or add the slide"
            )
        if not os.path.isfile(ann):
            raise ConversionError(f"{spec}: row {i + 2}: annotation file {ann} does not exist")
        out[slide] = ann
    return out


@dataclasses.dataclass(frozen=True)
class LabelRules:
    """How regions turn into tile labels (see the module docstring)."""

    min_overlap: float = 0.5
    unannotated: str = "unlabeled"  # or "drop"
    ignore_classes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TileLabels:
    """Per tile: a class index, UNLABELED, or DROPPED; and the dropped tiles per reason."""

    labels: np.ndarray  # int64 [n]
    dropped: dict[str, int]


def overlap_fractions(
    coords: np.ndarray, size_l0: int, geoms: list[shapely.Geometry]
) -> np.ndarray:
    """Fraction of each tile's area inside each geometry: float64 [n_tiles, n_geoms].

    Args:
      coords: int [n, 2] level-0 (x, y) of the tiles' top-left corners.
      size_l0: tile side in level-0 pixels.
      geoms: polygonal geometries; parts of one geometry must not overlap (merge them first).
    """
    coords = np.asarray(coords, np.float64).reshape(-1, 2)
    out = np.zeros((len(coords), len(geoms)))
    parts, owner = [], []
    for k, g in enumerate(geoms):
        for p in shapely.get_parts(shapely.get_parts(g)):  # collections of multipolygons too
            parts.append(p)
            owner.append(k)
    if not len(coords) or not parts:
        return out
    boxes = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + size_l0, coords[:, 1] + size_l0)
    parts_arr = np.asarray(parts, dtype=object)
    tree = shapely.STRtree(parts_arr)
    tile_idx, part_idx = tree.query(boxes, predicate="intersects")
    if not len(tile_idx):
        return out
    shapely.prepare(parts_arr)
    inside = shapely.contains_properly(parts_arr[part_idx], boxes[tile_idx])
    area = np.full(len(tile_idx), float(size_l0) ** 2)
    # Only tiles crossing a boundary need the clipped area; GEOS's rectangle clipping is ~4x
    # faster than a general intersection (BUILD_NOTES.md, "Region annotations").
    for k in np.flatnonzero(~inside):
        x, y = coords[tile_idx[k]]
        area[k] = shapely.clip_by_rect(parts_arr[part_idx[k]], x, y, x + size_l0, y + size_l0).area
    np.add.at(out, (tile_idx, np.asarray(owner)[part_idx]), area / float(size_l0) ** 2)
    return out


def merge_overlapping(geoms: list[shapely.Geometry]) -> shapely.Geometry:
    """One geometry of polygons with disjoint interiors covering ``geoms``.

    Only geometries that intersect another are unioned (a union of all costs more than the
    labelling itself when regions have thousands of vertices, and most regions touch no other).
    """
    arr = np.asarray(geoms, dtype=object)
    a, b = shapely.STRtree(arr).query(arr, predicate="intersects")
    parent = list(range(len(arr)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(a.tolist(), b.tolist()):
        if i < j:
            parent[find(j)] = find(i)
    groups: dict[int, list] = collections.defaultdict(list)
    for i in range(len(arr)):
        groups[find(i)].append(arr[i])
    merged = [g[0] if len(g) == 1 else shapely.union_all(g) for g in groups.values()]
    return shapely.geometrycollections(merged)


def label_tiles(
    coords: np.ndarray,
    size_l0: int,
    ann: SlideAnnotations,
    class_index: dict[str, int],
    rules: LabelRules,
) -> TileLabels:
    """Labels the tiles at ``coords`` from the regions of ``ann`` (rules: module docstring).

    Raises:
      ConversionError: a class that is neither in ``class_index`` nor an ignore class.
    """
    by_class: dict[str, list] = collections.defaultdict(list)
    for r in ann.regions:
        by_class[r.class_name].append(r.geometry)
    names = sorted(by_class)
    for n in names:
        if n not in class_index and not is_ignore_class(n, rules.ignore_classes):
            raise ConversionError(
                f"{ann.path}: class {n!r} is not in --class_names; add it, or list it in "
                "--ignore_classes"
            )
    merged = [merge_overlapping(by_class[n]) for n in names]
    frac = overlap_fractions(coords, size_l0, merged)
    hit = frac >= rules.min_overlap - 1e-9
    ignore = np.asarray([is_ignore_class(n, rules.ignore_classes) for n in names], bool)
    n = len(frac)
    labels = np.full(n, UNLABELED, np.int64)
    is_ignored = hit[:, ignore].any(1) if ignore.any() else np.zeros(n, bool)
    cls_hit = hit[:, ~ignore]
    n_hit = cls_hit.sum(1)
    cls_ids = np.asarray([class_index.get(nm, -1) for nm in names], np.int64)[~ignore]
    one = (n_hit == 1) & ~is_ignored
    if cls_ids.size:
        labels[one] = cls_ids[np.argmax(cls_hit[one], 1)]
    ambiguous = (n_hit > 1) & ~is_ignored
    labels[is_ignored | ambiguous] = DROPPED
    dropped = {"ignore": int(is_ignored.sum()), "ambiguous": int(ambiguous.sum())}
    unannotated = labels == UNLABELED
    if rules.unannotated == "drop":
        labels[unannotated] = DROPPED
        dropped["unannotated"] = int(unannotated.sum())
    return TileLabels(labels, {k: v for k, v in dropped.items() if v})


def read_slide_annotations(spec: str, entries: list) -> dict[str, SlideAnnotations]:
    """Slide path -> its annotations, from ``--annotations`` (empty when ``spec`` is "").

    Args:
      spec: the ``--annotations`` value.
      entries: the conversion's inputs (``manifest.Entry``); only slides are matched.
    """
    if not spec:
        return {}
    slide_entries = {e.path: e for e in entries if e.is_slide}
    matched = match_annotations(spec, sorted(slide_entries))
    out = {}
    for path, ann_path in sorted(matched.items()):
        if slide_entries[path].label is not None:
            raise ConversionError(
                f"{path} has a label in --slide_labels and annotations {ann_path}; give one"
            )
        try:
            size = slides.slide_size(path)
        except SkipInput:
            continue  # the slide is skipped (and reported) when planned
        out[path] = read_annotations(ann_path, size)
    return out


def label_slides(slide_plans: dict, anns: dict, index: dict[str, int], rules: LabelRules, notes):
    """Per annotated slide: its tiles' labels (class, UNLABELED or DROPPED) and a record.

    Args:
      slide_plans: slide path -> ``slides.SlidePlan`` (tile corners and size).
      anns: slide path -> its annotations.
      index: class name -> label.
      rules: the labelling rules.
      notes: the conversion's notes, appended to.

    Returns:
      slide path -> int64 [n_coords] labels, and the dataset.json records of the annotations.
    """
    tile_labels, records = {}, []
    total: collections.Counter = collections.Counter()
    for path, ann in anns.items():
        if path not in slide_plans:
            continue
        sp = slide_plans[path]
        tl = label_tiles(sp.coords, sp.size_l0, ann, index, rules)
        tile_labels[path] = tl.labels
        total.update(tl.dropped)
        records.append(
            {
                "slide": path,
                "annotations": ann.path,
                "sha256": ann.sha256,
                "regions": len(ann.regions),
                "labeled": int((tl.labels >= 0).sum()),
                "unlabeled": int((tl.labels == UNLABELED).sum()),
                "dropped": tl.dropped,
            }
        )
        notes += list(ann.notes)
    if anns:
        dropped = ", ".join(f"{k} {total[k]}" for k in DROP_REASONS if total[k])
        notes.append(
            f"annotations: {len(records)} slides labelled from regions "
            f"(min overlap {rules.min_overlap:g}); tiles dropped: {dropped or 'none'}"
        )
    return tile_labels, records
