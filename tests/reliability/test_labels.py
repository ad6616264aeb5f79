"""Labels that once gave a silently wrong data set (issue 31): one class only (cases 5), labels
that differ only in case or whitespace, and a manifest label that contradicts the file's class
folder (case 6)."""

import json
import os
import shutil

import numpy as np
import pytest

from kd_histo.cli import convert as convert_cli
from kd_histo.cli import flags_common as fc
from kd_histo.cli import train as train_cli

from .helpers import TINY_FLAGS, encoded, rgb, write

pytestmark = pytest.mark.reliability

ARGS = ["--tile_px=16", "--num_workers=0", "--progress=false", "--split_fractions=0.5,0.25,0.25"]


def _convert(capsys, *argv) -> tuple[int, str]:
    code = fc.invoke(convert_cli.PROG, convert_cli.main, [*argv, *ARGS])
    return code, capsys.readouterr().err.strip()


def _one_line(err: str, prog: str = convert_cli.PROG) -> str:
    err = err.strip()
    assert err.startswith(f"{prog}: error:") and "\n" not in err, err
    return err


def _tiles(folder, classes=("a", "b"), per_class=4) -> list[tuple[str, str]]:
    rows = []
    for c in classes:
        for i in range(per_class):
            rel = f"{c}/t{i}.png"
            write(os.path.join(folder, rel), encoded(rgb(len(rows)), "PNG"))
            rows.append((rel, c))
    return rows


def _manifest(folder, rows, header="path,label") -> str:
    path = os.path.join(folder, "manifest.csv")
    with open(path, "w") as f:
        f.write(header + "\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    return path


# --- case 5: one class -------------------------------------------------------------------------


def test_convert_refuses_a_folder_of_one_class(tmp_path, capsys):
    _tiles(tmp_path / "src", classes=("lung_aca",))
    code, err = _convert(capsys, f"--input_dir={tmp_path / 'src'}", f"--out_dir={tmp_path / 'o'}")
    assert code == 2
    line = _one_line(err)
    assert "one class" in line and "lung_aca" in line and str(tmp_path / "src") in line
    assert not (tmp_path / "o" / "dataset.json").exists()


def test_convert_refuses_one_class_even_with_two_class_names(tmp_path, capsys):
    rows = _tiles(tmp_path / "src", classes=("a",))
    manifest = _manifest(tmp_path / "src", rows)
    code, err = _convert(
        capsys, f"--manifest={manifest}", f"--out_dir={tmp_path / 'o'}", "--class_names=a,b"
    )
    assert code == 2
    assert "one class" in _one_line(err)


def test_one_class_is_converted_with_the_explicit_flag(tmp_path, capsys):
    _tiles(tmp_path / "src", classes=("lung_aca",))
    out = tmp_path / "o"
    code, err = _convert(
        capsys, f"--input_dir={tmp_path / 'src'}", f"--out_dir={out}", "--allow_one_class"
    )
    assert code == 0, err
    assert json.loads((out / "dataset.json").read_text())["class_names"] == ["lung_aca"]


def test_train_refuses_a_data_set_of_one_class(tiny_shards, tmp_path, capsys):
    """A data set converted before the refusal (or edited): dataset.json lists one class."""
    data = tmp_path / "data"
    shutil.copytree(tiny_shards, data)
    info = json.loads((data / "dataset.json").read_text())
    first = info["class_names"][0]
    info["class_names"] = [first]
    info["counts"] = {
        s: ({first: sum(c.values())} if s != "unlabeled" else c) for s, c in info["counts"].items()
    }
    (data / "dataset.json").write_text(json.dumps(info))
    model_dir = tmp_path / "m"
    argv = ["--mode=teacher", f"--data_dir={data}", f"--model_dir={model_dir}", *TINY_FLAGS]
    code = fc.invoke(train_cli.PROG, train_cli.main, argv)
    assert code == 2
    line = _one_line(capsys.readouterr().err, train_cli.PROG)
    assert "one class" in line and str(data) in line
    assert not model_dir.exists()


def test_train_refuses_a_train_split_holding_one_class(tiny_shards, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_shards, data)
    info = json.loads((data / "dataset.json").read_text())
    names = info["class_names"]
    info["counts"]["train"] = {n: (sum(info["counts"]["train"].values()) if i == 0 else 0)
                               for i, n in enumerate(names)}  # fmt: skip
    (data / "dataset.json").write_text(json.dumps(info))
    argv = ["--mode=baseline", f"--data_dir={data}", f"--model_dir={tmp_path / 'm'}", *TINY_FLAGS]
    code = fc.invoke(train_cli.PROG, train_cli.main, argv)
    assert code == 2
    line = _one_line(capsys.readouterr().err, train_cli.PROG)
    assert "train split" in line and "one class" in line


# --- case 6: labels that are one class spelt twice, labels against their class folder ---------


@pytest.mark.parametrize("variant", ["LUNG_ACA", "Lung_aca", "lung_aca ", "lung  aca"])
def test_manifest_labels_differing_in_case_or_whitespace_are_refused(tmp_path, capsys, variant):
    base = "lung aca" if variant == "lung  aca" else "lung_aca"
    rows = _tiles(tmp_path / "src", classes=("x", "y"))
    rows = [(p, base if p.startswith("x/") else "lung_n") for p, _ in rows]
    rows[1] = (rows[1][0], f'"{variant}"')  # quoted: the whitespace is the label's own
    manifest = _manifest(tmp_path / "src", rows)
    code, err = _convert(capsys, f"--manifest={manifest}", f"--out_dir={tmp_path / 'o'}")
    if variant == "lung_aca ":  # surrounding whitespace is stripped: one class, no error
        assert code == 0, err
        info = json.loads((tmp_path / "o" / "dataset.json").read_text())
        assert info["class_names"] == ["lung_aca", "lung_n"]
        return
    assert code == 2
    line = _one_line(err)
    assert repr(variant) in line and repr(base) in line and "case or whitespace" in line
    assert manifest in line or "t1.png" in line
    assert not (tmp_path / "o" / "dataset.json").exists()


def test_class_folders_differing_only_in_case_are_refused(tmp_path, capsys):
    _tiles(tmp_path / "src", classes=("LUNG_ACA", "lung_aca", "lung_n"))
    code, err = _convert(capsys, f"--input_dir={tmp_path / 'src'}", f"--out_dir={tmp_path / 'o'}")
    assert code == 2
    line = _one_line(err)
    assert "'LUNG_ACA'" in line and "'lung_aca'" in line and "case or whitespace" in line


def test_a_manifest_label_contradicting_the_class_folder_is_refused(tmp_path, capsys):
    rows = _tiles(tmp_path / "src", classes=("lung_aca", "lung_n"))
    rows[2] = (rows[2][0], "lung_n")  # lung_aca/t2.png labeled lung_n
    manifest = _manifest(tmp_path / "src", rows)
    code, err = _convert(capsys, f"--manifest={manifest}", f"--out_dir={tmp_path / 'o'}")
    assert code == 2
    line = _one_line(err)
    assert f"{manifest}:4" in line and "lung_aca/t2.png" in line
    assert "'lung_aca'" in line and "'lung_n'" in line
    assert not (tmp_path / "o" / "dataset.json").exists()


def test_folders_that_are_no_class_names_are_not_checked(tmp_path, capsys):
    """Tiles in per-slide folders (not class folders) carry any label."""
    rows = []
    for i in range(8):
        rel = f"slide{i % 2}/t{i}.png"
        write(os.path.join(tmp_path / "src", rel), encoded(rgb(i), "PNG"))
        rows.append((rel, "a" if i < 4 else "b"))
    manifest = _manifest(tmp_path / "src", rows)
    code, err = _convert(capsys, f"--manifest={manifest}", f"--out_dir={tmp_path / 'o'}")
    assert code == 0, err


# --- case 16 (and the label half of case 9): HDF5 labels that are no class index ------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.5, -1.0])
def test_an_hdf5_label_that_is_no_class_index_is_one_line_naming_file_and_index(
    tmp_path, capsys, bad
):
    h5py = pytest.importorskip("h5py", reason="h5py writes the test's HDF5 file")
    x = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    y = np.array([0, 1, 0, 1, 1, 0], np.float32)
    y[4] = bad
    with h5py.File(tmp_path / "p_x.h5", "w") as f:
        f["x"] = x
    with h5py.File(tmp_path / "p_y.h5", "w") as f:
        f["y"] = y
    code, err = _convert(
        capsys,
        f"--h5_images={tmp_path / 'p_x.h5'}",
        f"--h5_labels={tmp_path / 'p_y.h5'}",
        f"--out_dir={tmp_path / 'o'}",
    )
    assert code == 2, err
    line = _one_line(err)
    assert str(tmp_path / "p_y.h5") in line and "[4]" in line and "integer" in line
    assert not (tmp_path / "o" / "dataset.json").exists()
