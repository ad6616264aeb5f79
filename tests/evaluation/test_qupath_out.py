"""A slide's predictions as QuPath GeoJSON tile objects and as a pyramidal probability OME-TIFF,
read back with json/shapely and tifffile and checked against the probabilities they were made of."""

import json
import math
import uuid
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import shapely.geometry
import tifffile

from kd_histo.evaluation import qupath_out

NAMES = ["tumour", "stroma", "necrosis"]
OME = "{http://www.openmicroscopy.org/Schemas/OME/2016-06}"


def _tiles(rows=70, cols=100, size=64, seed=0):
    """Tiles on 70% of a rows x cols grid of ``size`` level-0 px, with Dirichlet probabilities."""
    rng = np.random.default_rng(seed)
    coords = [(c * size, r * size) for r in range(rows) for c in range(cols) if rng.random() < 0.7]
    return coords, rng.dirichlet(np.ones(len(NAMES)), len(coords))


def test_tile_features_are_qupath_tile_objects_of_the_probabilities(tmp_path):
    coords, probs = _tiles(rows=4, cols=5)
    teacher = np.arange(len(coords)) % 3 == 0
    fc = qupath_out.tile_features("s1", coords, 64, probs, NAMES, scored_by_teacher=teacher)
    path = qupath_out.write_geojson(str(tmp_path / "s1.geojson"), fc)
    back = json.loads(open(path).read())
    assert back["type"] == "FeatureCollection" and len(back["features"]) == len(coords)
    assert [p.name for p in tmp_path.iterdir()] == ["s1.geojson"]  # no temporary file left
    colours = {}
    for f, (x, y), p, t in zip(back["features"], coords, probs, teacher):
        assert f["type"] == "Feature" and uuid.UUID(f["id"]).version == 5
        ring = f["geometry"]["coordinates"][0]
        assert f["geometry"]["type"] == "Polygon" and len(ring) == 5 and ring[0] == ring[-1]
        poly = shapely.geometry.shape(f["geometry"])
        assert poly.is_valid and poly.bounds == (x, y, x + 64, y + 64) and poly.area == 64 * 64
        props = f["properties"]
        assert props["objectType"] == "tile"
        cls = props["classification"]
        assert cls["name"] == NAMES[int(np.argmax(p))]
        assert colours.setdefault(cls["name"], tuple(cls["color"])) == tuple(cls["color"])
        m = props["measurements"]
        np.testing.assert_allclose([m[f"prob_{c}"] for c in NAMES], p, atol=1e-6)
        entropy = -sum(v * math.log(v) for v in p if v > 0) / math.log(len(NAMES))
        assert m["entropy"] == pytest.approx(entropy, abs=1e-6)
        assert m["scored_by_teacher"] == float(t)
    assert len(set(colours.values())) == len(colours)  # one colour per class, distinct
    ids = [f["id"] for f in back["features"]]
    assert len(set(ids)) == len(ids)
    again = qupath_out.tile_features("s1", coords, 64, probs, NAMES, scored_by_teacher=teacher)
    assert again == fc  # deterministic ids and colours: a rerun writes the same file


def test_tile_features_without_cascade_as_detections_and_bad_input():
    coords, probs = _tiles(rows=2, cols=2)
    fc = qupath_out.tile_features("s", coords, 10, probs, NAMES, object_type="detection")
    props = [f["properties"] for f in fc["features"]]
    assert all(p["objectType"] == "detection" for p in props)
    assert all("scored_by_teacher" not in p["measurements"] for p in props)
    with pytest.raises(ValueError, match="object type"):
        qupath_out.tile_features("s", coords, 10, probs, NAMES, object_type="annotation")
    with pytest.raises(ValueError, match="probabilities"):
        qupath_out.tile_features("s", coords, 10, probs[:, :2], NAMES)


def test_class_colours_are_fixed_and_distinct():
    many = qupath_out.class_colours(30)
    assert len(set(many)) == 30 and all(0 <= v <= 255 for c in many for v in c)
    assert qupath_out.class_colours(4) == many[:4]  # a class's colour does not depend on n


def _halve_loop(a):
    """2x2 block means, rounded half up, by explicit loops over the pixels each block has."""
    c, h, w = a.shape
    out = np.zeros((c, (h + 1) // 2, (w + 1) // 2), np.uint8)
    for k in range(c):
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                block = a[k, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].astype(float)
                out[k, i, j] = math.floor(block.mean() + 0.5)
    return out


def test_probability_tiff_reads_back_with_channels_levels_and_physical_size(tmp_path):
    coords, probs = _tiles(rows=70, cols=100, size=64)
    # level 0 of 100x70 whole tiles, with a partial tile at the right and bottom edges
    grid = qupath_out.SlideGrid("dir/slide A.svs", 64, 0.2528, 64 * 100 + 40, 64 * 70 + 5)
    path = str(tmp_path / "slide A_probabilities.ome.tif")
    qupath_out.write_probability_tiff(path, grid, coords, probs, NAMES, smallest=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide A_probabilities.ome.tif"]
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and len(tif.series) == 1
        series = tif.series[0]
        assert series.axes == "CYX" and series.dtype == np.uint8
        levels = [lv.asarray() for lv in series.levels]
        pixels = ET.fromstring(tif.ome_metadata).find(f"{OME}Image/{OME}Pixels")
    assert [lv.shape for lv in levels] == [(3, 70, 100), (3, 35, 50), (3, 18, 25), (3, 9, 13)]
    assert [ch.get("Name") for ch in pixels.findall(f"{OME}Channel")] == NAMES
    a = pixels.attrib
    assert float(a["PhysicalSizeX"]) == pytest.approx(64 * 0.2528)
    assert float(a["PhysicalSizeY"]) == pytest.approx(64 * 0.2528)
    assert a["PhysicalSizeXUnit"] == a["PhysicalSizeYUnit"] == "µm"
    want = np.zeros((3, 70, 100), np.uint8)  # 0 where no tile was scored
    for (x, y), p in zip(coords, probs):
        want[:, y // 64, x // 64] = [math.floor(255 * v + 0.5) for v in p]
    np.testing.assert_array_equal(levels[0], want)
    for k in range(1, len(levels)):
        np.testing.assert_array_equal(levels[k], _halve_loop(levels[k - 1]))


def test_probability_tiff_levels_stop_when_small(tmp_path):
    coords, probs = _tiles(rows=3, cols=5, size=8)
    grid = qupath_out.SlideGrid("s.tif", 8, 0.5, 40, 24)
    path = str(tmp_path / "s_probabilities.ome.tif")
    qupath_out.write_probability_tiff(path, grid, coords, probs, NAMES)
    with tifffile.TiffFile(path) as tif:
        assert [lv.shape for lv in tif.series[0].levels] == [(3, 3, 5)]


def test_probability_tiff_is_the_same_bytes_for_the_same_tiles(tmp_path):
    # a rerun, a resumed run and the tasks of a job array must write the same file; the OME UUID
    # tifffile makes by default is time-based
    coords, probs = _tiles(rows=3, cols=5, size=8)
    grid = qupath_out.SlideGrid("s.tif", 8, 0.5, 40, 24)
    a, b, c = (str(tmp_path / f"{k}.ome.tif") for k in "abc")
    qupath_out.write_probability_tiff(a, grid, coords, probs, NAMES)
    qupath_out.write_probability_tiff(b, grid, coords, probs, NAMES)
    assert open(a, "rb").read() == open(b, "rb").read()
    qupath_out.write_probability_tiff(c, grid, coords, probs[:, ::-1].copy(), NAMES)
    uuids = [ET.fromstring(tifffile.TiffFile(p).ome_metadata).get("UUID") for p in (a, c)]
    assert uuids[0] != uuids[1]  # other content, another file's UUID
