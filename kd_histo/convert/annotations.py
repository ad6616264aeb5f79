"""Reads region annotations drawn on whole slides: QuPath GeoJSON (every dialect) and ASAP XML.

Coordinates are level-0 pixels, origin top left, as both tools write them. The readers return
typed frozen records (:class:`Region`, :class:`SlideAnnotations`) holding shapely 2 geometries.

QuPath GeoJSON, as the versions in use write it:
  - a ``FeatureCollection`` (0.3+ "FEATURE_COLLECTION" export), a bare JSON array of features
    (0.2 and the default export of later versions), or a single ``Feature``;
  - ``Polygon`` and ``MultiPolygon`` geometries, holes included (``GeometryCollection``: its
    polygonal parts);
  - the class in ``properties.classification`` with ``name`` and ``color`` [r, g, b] (0.3+) or
    ``colorRGB``, a packed (A)RGB int (0.2);
  - ``properties.objectType`` annotation, detection or tile: all are read alike.
ASAP XML (CAMELYON16): ``ASAP_Annotations/Annotations/Annotation[@PartOfGroup, @Type]/
Coordinates/Coordinate[@Order, @X, @Y]``, types Polygon, Rectangle and Spline (its control
points as a polygon). CAMELYON16's groups ``_0`` and ``_1`` are tumour (class ``Tumor``); ``_2``
and groups named ``Exclusion*`` are non-tumour cut-outs drawn inside tumour, subtracted from the
file's other regions.

Not regions, counted in :attr:`SlideAnnotations.notes` (never silently): objects without a class
(QuPath's unclassified annotations, e.g. a tissue outline), and points and lines (no area).
Self-intersecting polygons are repaired with ``shapely.make_valid`` and a note (logged, and in
``notes``) naming the file and the feature.

Bad input raises :class:`~kd_histo.convert.errors.ConversionError` in one line naming the file and
the feature: invalid JSON or XML, an unknown geometry type, a ring with fewer than 4 points,
coordinates outside the slide.

This module does not match files to slides and does not label tiles (``convert.regions``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import xml.etree.ElementTree as ET

import numpy as np
import shapely

from kd_histo.convert.errors import ConversionError

log = logging.getLogger(__name__)

GEOJSON_SUFFIXES = (".geojson", ".json")
XML_SUFFIXES = (".xml",)
ASAP_TUMOR_GROUPS = ("_0", "_1")  # CAMELYON16: tumour regions
ASAP_EXCLUSION_GROUPS = ("_2",)  # CAMELYON16: normal tissue inside tumour, a cut-out
NO_AREA_TYPES = ("Point", "MultiPoint", "LineString", "MultiLineString")


@dataclasses.dataclass(frozen=True)
class Region:
    """One classified region: a polygonal shapely geometry in level-0 pixels."""

    class_name: str
    geometry: shapely.Geometry  # Polygon or MultiPolygon, valid
    color: tuple[int, int, int] | None = None  # the drawing tool's class colour, when given


@dataclasses.dataclass(frozen=True)
class SlideAnnotations:
    """The regions of one annotation file."""

    path: str
    sha256: str
    regions: tuple[Region, ...]
    notes: tuple[str, ...] = ()

    @property
    def class_names(self) -> list[str]:
        return sorted({r.class_name for r in self.regions})


def read_annotations(path: str, size: tuple[int, int] | None = None) -> SlideAnnotations:
    """Reads a QuPath GeoJSON or ASAP XML file (by suffix; other suffixes: by content).

    Args:
      path: the file.
      size: the slide's level-0 (width, height); when given, coordinates outside it are refused.
    """
    with open(path, "rb") as f:
        data = f.read()
    lower = path.lower()
    is_xml = lower.endswith(XML_SUFFIXES) or (
        not lower.endswith(GEOJSON_SUFFIXES) and data.lstrip()[:1] == b"<"
    )
    notes: list[str] = []
    if is_xml:
        regions = _read_asap(path, data, size, notes)
    else:
        regions = _read_geojson(path, data, size, notes)
    return SlideAnnotations(path, hashlib.sha256(data).hexdigest(), tuple(regions), tuple(notes))


def region_outlines(ann: SlideAnnotations) -> list[tuple[str, np.ndarray]]:
    """(class name, level-0 exterior ring as float [N, 2] x, y) per polygon (e.g. to draw them)."""
    out = []
    for r in ann.regions:
        for poly in shapely.get_parts(r.geometry):
            out.append((r.class_name, shapely.get_coordinates(poly.exterior)))
    return out


# --- QuPath GeoJSON ----------------------------------------------------------------------------


def _read_geojson(path, data: bytes, size, notes: list[str]) -> list[Region]:
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e}); export GeoJSON from QuPath") from None
    if isinstance(doc, list):  # QuPath 0.2, and the default export of later versions
        features = doc
    elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    else:
        raise ConversionError(
            f"{path}: neither a FeatureCollection, a list of features nor a Feature; "
            "export GeoJSON from QuPath"
        )
    if not isinstance(features, list):
        raise ConversionError(f"{path}: 'features' is not a list")
    regions, unclassified, no_area = [], 0, 0
    for i, feat in enumerate(features):
        where = f"{path}: feature {i}"
        if not isinstance(feat, dict) or not isinstance(feat.get("geometry"), dict):
            raise ConversionError(f"{where}: not a GeoJSON Feature with a geometry")
        name, color = _classification(feat.get("properties") or {}, where)
        geom = feat["geometry"]
        if geom.get("type") in NO_AREA_TYPES:
            no_area += 1
            continue
        if name is None:
            unclassified += 1
            continue
        poly = _geojson_polygonal(geom, where)
        regions.append(Region(name, _checked(poly, where, size, notes), color))
    _count_notes(path, unclassified, no_area, notes)
    return regions


def _classification(props: dict, where: str) -> tuple[str | None, tuple[int, int, int] | None]:
    c = props.get("classification")
    if c is None:
        return None, None
    if isinstance(c, str):  # some scripts write the name alone
        return (c or None), None
    if not isinstance(c, dict):
        raise ConversionError(f"{where}: 'classification' is neither an object nor a name")
    name = c.get("name") or None
    color = None
    if isinstance(c.get("color"), list) and len(c["color"]) >= 3:
        color = tuple(int(v) for v in c["color"][:3])
    elif isinstance(c.get("colorRGB"), int):  # packed (A)RGB, signed in QuPath 0.2
        v = c["colorRGB"] & 0xFFFFFF
        color = ((v >> 16) & 255, (v >> 8) & 255, v & 255)
    return name, color


def _geojson_polygonal(geom: dict, where: str) -> shapely.Geometry:
    kind, coords = geom.get("type"), geom.get("coordinates")
    if kind == "Polygon":
        return _polygon(coords, where)
    if kind == "MultiPolygon":
        if not isinstance(coords, list) or not coords:
            raise ConversionError(f"{where}: MultiPolygon without polygons")
        return shapely.multipolygons([_polygon(p, where) for p in coords])
    if kind == "GeometryCollection":
        parts = [
            _geojson_polygonal(g, where)
            for g in geom.get("geometries", [])
            if g.get("type") not in NO_AREA_TYPES
        ]
        if not parts:
            raise ConversionError(f"{where}: GeometryCollection without polygons")
        return shapely.union_all(parts)
    raise ConversionError(
        f"{where}: unknown geometry type {kind!r}; regions must be Polygon or MultiPolygon"
    )


def _polygon(rings, where: str) -> shapely.Polygon:
    if not isinstance(rings, list) or not rings:
        raise ConversionError(f"{where}: Polygon without rings")
    arrays = []
    for k, ring in enumerate(rings):
        try:
            a = np.asarray(ring, np.float64)
        except (TypeError, ValueError):
            a = np.zeros((0,))
        if a.ndim != 2 or a.shape[1] < 2:
            raise ConversionError(f"{where}: ring {k} is not a list of [x, y] points")
        if len(a) < 4:
            raise ConversionError(
                f"{where}: ring {k} has {len(a)} points; a closed ring needs at least 4"
            )
        arrays.append(a[:, :2])
    return shapely.Polygon(arrays[0], arrays[1:])


# --- ASAP XML ----------------------------------------------------------------------------------


def _read_asap(path, data: bytes, size, notes: list[str]) -> list[Region]:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise ConversionError(f"{path}: not valid XML ({e}); expected ASAP annotations") from None
    if root.tag != "ASAP_Annotations":
        raise ConversionError(f"{path}: root element <{root.tag}>, expected <ASAP_Annotations>")
    keep: dict[str, list] = {}
    cut: list = []
    unclassified = no_area = 0
    for i, ann in enumerate(root.iter("Annotation")):
        where = f"{path}: annotation {i}"
        kind = ann.get("Type", "Polygon")
        if kind in ("Dot", "PointSet", "Measurement"):
            no_area += 1
            continue
        if kind not in ("Polygon", "Rectangle", "Spline"):
            raise ConversionError(
                f"{where}: unknown geometry type {kind!r}; expected Polygon, Rectangle or Spline"
            )
        group = ann.get("PartOfGroup") or ""
        if group in ("", "None"):
            unclassified += 1
            continue
        poly = _checked(_asap_polygon(ann, where), where, size, notes)
        if group in ASAP_EXCLUSION_GROUPS or group.lower().startswith("exclusion"):
            cut.append(poly)
        else:
            keep.setdefault("Tumor" if group in ASAP_TUMOR_GROUPS else group, []).append(poly)
    _count_notes(path, unclassified, no_area, notes)
    holes = shapely.union_all(cut) if cut else None
    regions = []
    for name in sorted(keep):
        for poly in keep[name]:
            if holes is not None:
                poly = _polygonal(shapely.difference(poly, holes))
            if not poly.is_empty:
                regions.append(Region(name, poly))
    return regions


def _asap_polygon(ann, where: str) -> shapely.Polygon:
    pts = []
    for c in ann.iter("Coordinate"):
        try:
            pts.append((float(c.get("Order", len(pts))), float(c.get("X")), float(c.get("Y"))))
        except (TypeError, ValueError):
            raise ConversionError(f"{where}: a Coordinate without numeric X, Y") from None
    pts.sort(key=lambda p: p[0])
    xy = np.asarray([p[1:] for p in pts], np.float64).reshape(-1, 2)
    if len(xy) and (xy[0] == xy[-1]).all():
        xy = xy[:-1]
    if len(xy) < 3:  # closed: 3 corners + the first again
        raise ConversionError(
            f"{where}: ring has {len(xy) + 1} points when closed; a closed ring needs at least 4"
        )
    return shapely.Polygon(xy)


# --- shared checks -----------------------------------------------------------------------------


def _checked(poly, where: str, size, notes: list[str]) -> shapely.Geometry:
    """Refuses coordinates outside the slide; repairs invalid polygons with a note."""
    if size is not None:
        xmin, ymin, xmax, ymax = shapely.bounds(poly)
        if xmin < 0 or ymin < 0 or xmax > size[0] or ymax > size[1]:
            raise ConversionError(
                f"{where}: coordinates ({xmin:g}, {ymin:g})-({xmax:g}, {ymax:g}) lie outside the "
                f"{size[0]}x{size[1]} slide; was it drawn on another slide or level?"
            )
    if not shapely.is_valid(poly):
        reason = shapely.is_valid_reason(poly)
        poly = _polygonal(shapely.make_valid(poly))
        note = f"{where}: invalid polygon ({reason}) repaired with shapely.make_valid"
        log.warning(note)
        notes.append(note)
    return poly


def _polygonal(geom) -> shapely.Geometry:
    """The polygonal part of a geometry (make_valid and difference may add lines or points)."""
    if isinstance(geom, (shapely.Polygon, shapely.MultiPolygon)):
        return geom
    parts = [g for g in shapely.get_parts(geom) if isinstance(g, shapely.Polygon)]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def _count_notes(path: str, unclassified: int, no_area: int, notes: list[str]) -> None:
    name = os.path.basename(path)
    if unclassified:
        notes.append(f"{name}: {unclassified} objects without a class ignored")
    if no_area:
        notes.append(f"{name}: {no_area} points or lines ignored (no area)")
