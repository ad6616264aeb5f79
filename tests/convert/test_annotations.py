"""Region annotations in: QuPath GeoJSON dialects and ASAP XML, read, matched, made labels.

The end-to-end test checks every converted tile's label against an independent overlap: the
regions rasterised with PIL's polygon fill (4x supersampled) and the tile's pixels counted, no
shapely involved.
"""

import collections
import hashlib
import json
import os
import shlex
import shutil

import numpy as np
import pytest
import shapely
from PIL import Image, ImageDraw
from support import REPO

from kd_histo import schema
from kd_histo.convert import ConversionError, ConvertConfig, EncodeOptions, convert, regions
from kd_histo.convert.annotations import Region, SlideAnnotations, read_annotations, region_outlines
from kd_histo.data import synthetic

from .helpers import read_split
from .pyramid_tiff import write_pyramid_tiff

SIDE, TILE, MPP = 512, 32, 0.25  # level-0 px, tile side (tile_px at target_mpp = MPP), µm/px
SS = 4  # supersampling of the reference raster

# Region drawings in level-0 px: (class, [(exterior, [holes])]).
TUMOR_FC = [  # a MultiPolygon: a square with a square hole, and a triangle
    (
        [(40, 40), (300, 40), (300, 300), (40, 300)],
        [[(110, 110), (230, 110), (230, 230), (110, 230)]],
    ),
    ([(350, 50), (500, 60), (420, 200)], []),
]
STROMA_FC = [([(250, 250), (480, 270), (460, 470), (270, 450)], [])]  # overlaps the tumour square
IGNORE_FC = [([(20, 380), (200, 380), (200, 500), (20, 500)], [])]
STROMA_ARR = [([(30, 30), (200, 60), (180, 220), (60, 200)], [])]
TUMOR_ARR = [([(300, 300), (490, 310), (470, 490)], [])]
TUMOR_XML = [([(50, 50), (300, 70), (280, 300), (70, 280)], [])]  # group _0
CUT_XML = [([(120, 120), (200, 120), (200, 200), (120, 200)], [])]  # group _2: cut out of _0
STROMA_XML = [([(320, 320), (480, 320), (480, 480), (320, 480)], [])]  # a Rectangle


def _ring(points):
    return [[float(x), float(y)] for x, y in points + points[:1]]


def _feature(name, polys, color_key="color", multi=False, object_type="annotation"):
    rings = [[_ring(ext)] + [_ring(h) for h in holes] for ext, holes in polys]
    geom = (
        {"type": "MultiPolygon", "coordinates": rings}
        if multi
        else {"type": "Polygon", "coordinates": rings[0]}
    )
    props = {"objectType": object_type}
    if name is not None:
        cls = {"name": name}
        if color_key == "color":
            cls["color"] = [200, 0, 0]
        else:
            cls["colorRGB"] = -3670016  # packed ARGB as QuPath 0.2 writes it
        props["classification"] = cls
    return {"type": "Feature", "id": "x", "geometry": geom, "properties": props}


def _asap_xml(groups):
    out = ['<?xml version="1.0"?><ASAP_Annotations><Annotations>']
    for k, (group, kind, polys) in enumerate(groups):
        for ext, _ in polys:
            out.append(f'<Annotation Name="A{k}" Type="{kind}" PartOfGroup="{group}"><Coordinates>')
            out += [f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(ext)]
            out.append("</Coordinates></Annotation>")
    out.append("</Annotations><AnnotationGroups/></ASAP_Annotations>")
    return "".join(out)


def _raster(polys) -> np.ndarray:
    """Boolean mask at SS x level 0: exteriors filled, each polygon's holes cleared."""
    mask = np.zeros((SIDE * SS, SIDE * SS), bool)
    for ext, holes in polys:
        img = Image.new("1", (SIDE * SS, SIDE * SS), 0)
        draw = ImageDraw.Draw(img)
        draw.polygon([(x * SS, y * SS) for x, y in ext], fill=1)
        for h in holes:
            draw.polygon([(x * SS, y * SS) for x, y in h], fill=0)
        mask |= np.asarray(img, bool)
    return mask


def _tile_fractions(mask: np.ndarray) -> np.ndarray:
    """Fraction of each TILE x TILE level-0 tile inside ``mask``: [rows, cols]."""
    n, t = SIDE // TILE, TILE * SS
    return mask.reshape(n, t, n, t).mean(axis=(1, 3))


@pytest.fixture(scope="module")
def slide_img():
    rng = np.random.default_rng(0)
    img = np.zeros((SIDE, SIDE, 3), np.uint8)
    for i in range(SIDE // 64):
        for j in range(SIDE // 64):
            img[i * 64 : (i + 1) * 64, j * 64 : (j + 1) * 64] = synthetic.render_tile(
                rng, (i + j) % 4, 64
            )
    return img


def test_every_tile_label_matches_a_rasterised_overlap(slide_img, tmp_path):
    slides_dir, ann_dir = tmp_path / "slides", tmp_path / "ann"
    slides_dir.mkdir()
    ann_dir.mkdir()
    write_pyramid_tiff(str(slides_dir / "fc.tif"), slide_img, MPP, levels=2)
    for name in ("arr", "asap"):
        shutil.copy(slides_dir / "fc.tif", slides_dir / f"{name}.tif")
    fc = {
        "type": "FeatureCollection",
        "features": [
            _feature("Tumor", TUMOR_FC, multi=True),
            _feature("Stroma", STROMA_FC),
            _feature("Ignore*", IGNORE_FC),
            _feature(None, [([(0, 0), (511, 0), (511, 511)], [])]),  # unclassified: not a region
        ],
    }
    (ann_dir / "fc.geojson").write_text(json.dumps(fc))
    arr = [  # QuPath 0.2: a bare array, colorRGB, no objectType on one feature
        _feature("Stroma", STROMA_ARR, color_key="colorRGB", object_type="detection"),
        _feature("Tumor", TUMOR_ARR, color_key="colorRGB", object_type="tile"),
    ]
    (ann_dir / "arr.tif.json").write_text(json.dumps(arr))  # QuPath names exports by image name
    xml = _asap_xml(
        [
            ("_0", "Polygon", TUMOR_XML),
            ("_2", "Polygon", CUT_XML),
            ("Stroma", "Rectangle", STROMA_XML),
        ]
    )
    (ann_dir / "asap.xml").write_text(xml)

    t = 0.5
    out = tmp_path / "out"
    info = convert(
        ConvertConfig(
            out_dir=str(out),
            slides=(str(slides_dir / "*.tif"),),
            annotations=str(ann_dir),
            min_annotation_overlap=t,
            fractions=(1.0, 0.0, 0.0),
            encode=EncodeOptions(tile_px=TILE, target_mpp=MPP, min_tissue=0.0),
        )
    )
    assert info.class_names == ["Stroma", "Tumor"]
    got = {}
    for split in ("train", "unlabeled"):
        for r in read_split(str(out), split):
            got[(r["slide_id"].decode(), r["x"], r["y"])] = r["label"]

    cut = _raster(CUT_XML)
    reference = {  # slide -> class -> reference mask
        "fc": {
            "Tumor": _raster(TUMOR_FC),
            "Stroma": _raster(STROMA_FC),
            "Ignore*": _raster(IGNORE_FC),
        },
        "arr": {"Stroma": _raster(STROMA_ARR), "Tumor": _raster(TUMOR_ARR)},
        "asap": {"Tumor": _raster(TUMOR_XML) & ~cut, "Stroma": _raster(STROMA_XML)},
    }
    outcomes, borderline, checked = {}, 0, 0
    n = SIDE // TILE
    for slide, masks in reference.items():
        fracs = {c: _tile_fractions(m) for c, m in masks.items()}
        for i in range(n):
            for j in range(n):
                f = {c: float(v[i, j]) for c, v in fracs.items()}
                if any(abs(v - t) < 0.02 for v in f.values()):
                    borderline += 1  # within the raster's error of the threshold: not judged
                    continue
                hits = [c for c, v in f.items() if v >= t and not c.startswith("Ignore")]
                if f.get("Ignore*", 0) >= t:
                    want = "ignore"
                elif len(hits) > 1:
                    want = "ambiguous"
                elif hits:
                    want = info.class_names.index(hits[0])
                else:
                    want = schema.UNLABELED
                key = (slide, j * TILE, i * TILE)
                if isinstance(want, str):
                    assert key not in got, (key, want, f)
                else:
                    assert got.get(key, "missing") == want, (key, want, f)
                outcomes[want] = outcomes.get(want, 0) + 1
                checked += 1
    assert borderline <= 0.05 * checked, (borderline, checked)
    # Each outcome occurs, so every rule was exercised.
    assert set(outcomes) == {0, 1, schema.UNLABELED, "ignore", "ambiguous"}, outcomes
    # No tile inside the tumour's hole (fc) or the _2 cut-out (asap) is labelled.
    for slide, (x0, y0, x1, y1) in (("fc", (110, 110, 230, 230)), ("asap", (120, 120, 200, 200))):
        inside = [k for k in got if k[0] == slide and x0 <= k[1] and k[1] + TILE <= x1]
        inside = [k for k in inside if y0 <= k[2] and k[2] + TILE <= y1]
        assert inside and all(got[k] == schema.UNLABELED for k in inside), slide
    records = {r["slide"].split("/")[-1]: r for r in info.annotations}
    assert sorted(records) == ["arr.tif", "asap.tif", "fc.tif"]
    for name, r in records.items():
        with open(r["annotations"], "rb") as f:
            assert r["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert records["fc.tif"]["dropped"]["ignore"] >= outcomes["ignore"]
    assert any("objects without a class ignored" in note for note in info.notes)


# --- the readers: dialects -------------------------------------------------------------------


def test_dialects_read_to_the_same_regions(tmp_path):
    feat = _feature("Tumor", TUMOR_FC, multi=True)
    as_fc = tmp_path / "fc.geojson"
    as_fc.write_text(json.dumps({"type": "FeatureCollection", "features": [feat]}))
    as_arr = tmp_path / "arr.geojson"
    as_arr.write_text(json.dumps([feat]))
    as_one = tmp_path / "one.json"
    as_one.write_text(json.dumps(feat))
    areas = []
    for p in (as_fc, as_arr, as_one):
        a = read_annotations(str(p), (SIDE, SIDE))
        assert [r.class_name for r in a.regions] == ["Tumor"] and a.regions[0].color == (200, 0, 0)
        areas.append(a.regions[0].geometry.area)
    hole = 120 * 120
    triangle = abs((500 - 350) * (200 - 50) - (420 - 350) * (60 - 50)) / 2
    assert areas == [260 * 260 - hole + triangle] * 3


def test_color_rgb_packed_int_and_legacy_properties(tmp_path):
    f = _feature("Stroma", STROMA_ARR, color_key="colorRGB")
    del f["properties"]["objectType"]
    p = tmp_path / "a.geojson"
    p.write_text(json.dumps([f]))
    (r,) = read_annotations(str(p)).regions
    v = -3670016 & 0xFFFFFF
    assert r.color == (v >> 16, (v >> 8) & 255, v & 255) == (200, 0, 0)


def test_asap_groups_exclusion_and_rectangle(tmp_path):
    p = tmp_path / "c.xml"
    p.write_text(
        _asap_xml(
            [
                ("_1", "Polygon", TUMOR_XML),
                ("_2", "Polygon", CUT_XML),
                ("Stroma", "Rectangle", STROMA_XML),
            ]
        )
    )
    a = read_annotations(str(p), (SIDE, SIDE))
    by = {r.class_name: r.geometry for r in a.regions}
    assert sorted(by) == ["Stroma", "Tumor"]
    assert by["Stroma"].area == 160 * 160
    assert not by["Tumor"].contains(shapely.Point(160, 160))  # in the cut-out
    outlines = region_outlines(a)
    assert {c for c, _ in outlines} == {"Stroma", "Tumor"}
    assert all(ring.ndim == 2 and ring.shape[1] == 2 for _, ring in outlines)


def test_self_intersecting_polygon_repaired_with_a_note(tmp_path, caplog):
    bowtie = [([(0, 0), (100, 100), (100, 0), (0, 100)], [])]
    p = tmp_path / "b.geojson"
    p.write_text(json.dumps([_feature("Tumor", STROMA_ARR), _feature("Tumor", bowtie)]))
    a = read_annotations(str(p), (SIDE, SIDE))
    assert a.regions[1].geometry.is_valid and a.regions[1].geometry.area == pytest.approx(5000)
    assert len(a.notes) == 1 and f"{p}: feature 1" in a.notes[0] and "make_valid" in a.notes[0]
    assert f"{p}: feature 1" in caplog.text


# --- the readers: errors, one line naming file and feature -------------------------------------


def _one_line_error(path, expect, size=(SIDE, SIDE)):
    with pytest.raises(ConversionError) as e:
        read_annotations(str(path), size)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and all(s in msg for s in expect), msg


def test_errors_name_file_and_feature(tmp_path):
    bad = tmp_path / "bad.geojson"
    bad.write_text('{"type": "FeatureCollection", "features": [')
    _one_line_error(bad, ["not valid JSON"])

    ok = _feature("Tumor", STROMA_ARR)
    line = {"type": "Feature", "geometry": {"type": "Curve", "coordinates": []}, "properties": {}}
    line["properties"]["classification"] = {"name": "Tumor"}
    p = tmp_path / "geom.geojson"
    p.write_text(json.dumps([ok, line]))
    _one_line_error(p, ["feature 1", "unknown geometry type 'Curve'"])

    short = _feature("Tumor", STROMA_ARR)
    short["geometry"]["coordinates"] = [[[0, 0], [10, 0], [0, 0]]]
    p = tmp_path / "short.geojson"
    p.write_text(json.dumps([ok, ok, short]))
    _one_line_error(p, ["feature 2", "3 points", "at least 4"])

    p = tmp_path / "outside.geojson"
    p.write_text(json.dumps([ok]))
    _one_line_error(p, ["feature 0", "outside the 100x100 slide"], size=(100, 100))

    p = tmp_path / "short.xml"
    p.write_text(_asap_xml([("_0", "Polygon", [([(0, 0), (10, 0)], [])])]))
    _one_line_error(p, ["annotation 0", "at least 4"])

    p = tmp_path / "bad.xml"
    p.write_text("<ASAP_Annotations><Annotations>")
    _one_line_error(p, ["not valid XML"])


def test_file_matching_no_slide_is_an_error(tmp_path):
    (tmp_path / "a.geojson").write_text("[]")
    (tmp_path / "zz.geojson").write_text("[]")
    with pytest.raises(ConversionError) as e:
        regions.match_annotations(str(tmp_path), ["slides/a.svs"])
    assert str(tmp_path / "zz.geojson") in str(e.value) and "matches no slide" in str(e.value)
    assert regions.match_annotations(str(tmp_path / "a.*"), ["slides/a.svs"]) == {
        "slides/a.svs": str(tmp_path / "a.geojson")
    }


def test_csv_matches_slides_to_files(tmp_path):
    (tmp_path / "regions_1.geojson").write_text("[]")
    table = tmp_path / "pairs.csv"
    table.write_text("slide,annotations\nb.svs,regions_1.geojson\n")
    got = regions.match_annotations(str(table), ["x/a.svs", "x/b.svs"])
    assert got == {"x/b.svs": str(tmp_path / "regions_1.geojson")}
    table.write_text("slide,annotations\nc.svs,regions_1.geojson\n")
    with pytest.raises(ConversionError, match="row 2: slide 'c.svs' is none of the --slides"):
        regions.match_annotations(str(table), ["x/a.svs"])


def test_unannotated_drop_and_ignore_classes_flag():
    square = shapely.box(0, 0, 64, 64)
    ann = SlideAnnotations("a.geojson", "0", (Region("Tumor", square), Region("Necrosis", square)))
    coords = np.array([[0, 0], [32, 0], [64, 0], [96, 0]])
    rules = regions.LabelRules(0.5, "drop", ("Necrosis",))
    tl = regions.label_tiles(coords, 32, ann, {"Tumor": 0}, rules)
    # Necrosis is ignored and wins over Tumor; the last two tiles lie outside every region.
    assert tl.labels.tolist() == [regions.DROPPED] * 4
    assert tl.dropped == {"ignore": 2, "unannotated": 2}
    index = {"Necrosis": 0, "Tumor": 1}
    tl = regions.label_tiles(coords, 32, ann, index, regions.LabelRules(0.5, "unlabeled"))
    assert tl.labels.tolist() == [regions.DROPPED] * 2 + [schema.UNLABELED] * 2
    assert tl.dropped == {"ambiguous": 2}


def test_the_readme_command_runs_as_written(slide_img, tmp_path, monkeypatch):
    """README "Working with QuPath", step 2, verbatim (a 448 px slide at 0.5 µm/px: 4 tiles)."""
    import re

    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    block = readme[readme.index("## Working with QuPath") :]
    command = re.search(r"```bash\n(kd-histo-convert .*?)\n```", block, re.S)[1]
    args = shlex.split(command.replace("\\\n", " "))[1:]
    (tmp_path / "slides").mkdir()
    (tmp_path / "annotations").mkdir()
    write_pyramid_tiff(str(tmp_path / "slides" / "s1.svs"), slide_img[:448, :448], 0.5, levels=2)
    features = [
        _feature("Tumor", [([(0, 0), (224, 0), (224, 448), (0, 448)], [])]),
        _feature("Stroma", [([(224, 0), (448, 0), (448, 224), (224, 224)], [])]),
    ]
    (tmp_path / "annotations" / "s1.geojson").write_text(json.dumps(features))
    from kd_histo.cli import convert as cli
    from kd_histo.cli import flags_common as fc

    monkeypatch.chdir(tmp_path)
    assert fc.invoke(cli.PROG, cli.main, args) == 0
    info = schema.DatasetInfo.read(str(tmp_path / "shards" / "regions"))
    assert info.class_names == ["Stroma", "Tumor"] and info.tile_px == 224
    total = collections.Counter()
    for counts in info.counts.values():
        total.update(counts)
    assert total == {"Tumor": 2, "Stroma": 1, "unlabeled": 1}
    (record,) = info.annotations
    assert record["annotations"] == os.path.join("annotations", "s1.geojson")


def test_resume_refuses_edited_annotations(slide_img, tmp_path):
    from kd_histo.convert import run_task

    write_pyramid_tiff(str(tmp_path / "s.tif"), slide_img[:128, :128], MPP, levels=2)
    ann = tmp_path / "s.geojson"
    ann.write_text(json.dumps([_feature("Tumor", [([(0, 0), (64, 0), (64, 64)], [])])]))
    cfg = ConvertConfig(
        out_dir=str(tmp_path / "out"),
        slides=(str(tmp_path / "s.tif"),),
        annotations=str(ann),
        allow_one_class=True,  # one region class: enough to test resuming
        encode=EncodeOptions(tile_px=TILE, target_mpp=MPP, min_tissue=0.0),
    )
    run_task(cfg)
    run_task(cfg)  # unchanged: resumes
    ann.write_text(json.dumps([_feature("Stroma", [([(0, 0), (64, 0), (64, 64)], [])])]))
    with pytest.raises(ConversionError, match="annotations_sha256"):
        run_task(cfg)


# --- the round trip: predictions out as QuPath tiles, back in as regions ---------------------


def test_predicted_tiles_read_back_as_regions_give_the_same_boxes_and_labels(slide_img, tmp_path):
    """kd-histo-predict's GeoJSON (``qupath_out.tile_features``, one square per scored tile, the
    predicted class as its classification) read back as annotations and converted on the same
    grid: the same tile boxes, each labelled with its predicted class, and nothing else labeled."""
    from kd_histo.convert import slides
    from kd_histo.evaluation import qupath_out

    slides_dir = tmp_path / "slides"
    slides_dir.mkdir()
    write_pyramid_tiff(str(slides_dir / "s.tif"), slide_img, MPP, levels=2)
    plan = slides.plan_slide(str(slides_dir / "s.tif"), TILE, MPP, min_tissue=0.0)
    coords = [(int(x), int(y)) for x, y in plan.coords]
    names = ["Stroma", "Tumor", "Lymphocytes"]
    rng = np.random.default_rng(3)
    scored = rng.random(len(coords)) < 0.7  # predict scores tissue tiles only: leave some out
    probs = rng.dirichlet(np.ones(len(names)), size=int(scored.sum()))
    kept = [c for c, s in zip(coords, scored) if s]
    ann = tmp_path / "s.geojson"
    qupath_out.write_geojson(
        str(ann), qupath_out.tile_features("s", kept, plan.size_l0, probs, names)
    )
    info = convert(
        ConvertConfig(
            out_dir=str(tmp_path / "out"),
            slides=(str(slides_dir / "s.tif"),),
            annotations=str(ann),
            class_names=tuple(names),
            fractions=(1.0, 0.0, 0.0),
            encode=EncodeOptions(tile_px=TILE, target_mpp=MPP, min_tissue=0.0),
        )
    )
    assert info.class_names == names
    labelled = {
        (r["x"], r["y"]): r["label"]
        for r in read_split(str(tmp_path / "out"), "train")
        if r["label"] != schema.UNLABELED
    }
    expected = {c: int(p.argmax()) for c, p in zip(kept, probs)}
    assert labelled == expected
