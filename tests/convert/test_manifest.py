"""Listing inputs: manifests (labels, ids, splits, root confinement) and class folders."""

import pytest
from support import REPO

from kd_histo.convert import manifest
from kd_histo.convert.manifest import ManifestError

from .helpers import random_rgb, write_image


def _csv(tmp_path, text, name="m.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_manifest_rows_become_entries_with_defaults(tmp_path):
    path = _csv(
        tmp_path,
        "path,label,slide_id,patient_id,split\na/x.png,tumour,s1,p1,test\nb/y.png,,,,\nz.svs,stroma,,,\n",
    )
    e = manifest.read_manifest(path)
    assert e[0] == manifest.Entry(str(tmp_path / "a/x.png"), "tumour", "s1", "p1", "test", False)
    assert e[1].label is None and e[1].slide_id == "y" and e[1].split == ""  # stem = pseudo-slide
    assert e[2].is_slide and e[2].label == "stroma"


@pytest.mark.parametrize(
    "text,match",
    [
        ("file,label\na.png,x\n", "'path' column"),
        ("path,label\na.png,x\na.png,y\n", "duplicate path"),
        ("path,label,split\na.png,x,holdout\n", "split 'holdout'"),
        ("path,label\n,x\n", "empty path"),
        ("path,label\n", "lists no files"),
    ],
)
def test_bad_manifests_fail_with_one_line_fix(tmp_path, text, match):
    with pytest.raises(ManifestError, match=match) as e:
        manifest.read_manifest(_csv(tmp_path, text))
    assert "\n" not in str(e.value)


@pytest.mark.reliability
def test_missing_manifest_and_root_escape(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        manifest.read_manifest(str(tmp_path / "nope.csv"))
    (tmp_path / "root").mkdir()
    path = _csv(tmp_path / "root", "path,label\n../outside.png,x\n")
    with pytest.raises(ManifestError, match="outside --root"):
        manifest.read_manifest(path, root=str(tmp_path / "root"))


def test_scan_folder_lists_classes_unlabeled_and_skips_unsupported(tmp_path):
    write_image(tmp_path / "b_cls" / "1.png", random_rgb(0))
    write_image(tmp_path / "a_cls" / "sub" / "2.jpg", random_rgb(1))
    write_image(tmp_path / "unlabeled" / "3.png", random_rgb(2))
    (tmp_path / "a_cls" / "notes.xyz").write_text("x")
    entries, skipped = manifest.scan_folder(str(tmp_path))
    assert [(e.label, e.slide_id) for e in entries] == [("a_cls", "2"), ("b_cls", "1"), (None, "3")]
    assert skipped == [
        {"path": str(tmp_path / "a_cls" / "notes.xyz"), "reason": "unsupported file type .xyz"}
    ]
    assert manifest.class_names_of(entries) == ["a_cls", "b_cls"]


def test_folder_errors_missing_and_empty_class(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        manifest.scan_folder(str(tmp_path / "nope"))
    (tmp_path / "empty_cls").mkdir()
    write_image(tmp_path / "ok" / "1.png", random_rgb(0))
    with pytest.raises(ManifestError, match="empty_cls holds no images"):
        manifest.scan_folder(str(tmp_path))


def test_class_names_given_must_cover_labels():
    entries = [manifest.Entry("a", "x", "a"), manifest.Entry("b", "y", "b")]
    assert manifest.class_names_of(entries, ["y", "x", "z"]) == ["y", "x", "z"]
    with pytest.raises(ManifestError, match=r"labels \['y'\] are not in --class_names=x"):
        manifest.class_names_of(entries, ["x"])


def test_write_manifest_of_two_folders_round_trips_with_their_splits(tmp_path):
    write_image(tmp_path / "big" / "ADI" / "a1.tif", random_rgb(0))
    write_image(tmp_path / "big" / "TUM" / "t1.tif", random_rgb(1))
    write_image(tmp_path / "val7k" / "ADI" / "a2.tif", random_rgb(2))
    out = tmp_path / "lists" / "nct.csv"
    counts = manifest.write_manifest(
        [(str(tmp_path / "big"), ""), (str(tmp_path / "val7k"), "test")], str(out)
    )
    assert counts == {str(tmp_path / "big"): 2, str(tmp_path / "val7k"): 1}
    assert "../big/ADI/a1.tif" in out.read_text()  # relative to the manifest's folder
    entries = manifest.read_manifest(str(out))
    assert [(e.path, e.label, e.split) for e in entries] == [
        (str(tmp_path / "big" / "ADI" / "a1.tif"), "ADI", ""),
        (str(tmp_path / "big" / "TUM" / "t1.tif"), "TUM", ""),
        (str(tmp_path / "val7k" / "ADI" / "a2.tif"), "ADI", "test"),
    ]
    with pytest.raises(ManifestError, match="split 'holdout' for"):
        manifest.write_manifest([(str(tmp_path / "big"), "holdout")], str(out))


def test_make_manifest_tool_runs(tmp_path):
    import subprocess
    import sys

    write_image(tmp_path / "set" / "A" / "1.png", random_rgb(0))
    tool = str(REPO / "tools" / "make_manifest.py")
    ok = subprocess.run(
        [
            sys.executable,
            tool,
            f"--folders={tmp_path / 'set'}",
            "--splits=test",
            f"--out={tmp_path / 'm.csv'}",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "1 tiles from" in ok.stdout, ok.stderr
    assert manifest.read_manifest(str(tmp_path / "m.csv"))[0].split == "test"
    bad = subprocess.run(
        [sys.executable, tool, f"--folders={tmp_path / 'nope'}", f"--out={tmp_path / 'x.csv'}"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "input folder" in bad.stderr and "Traceback" not in bad.stderr
