"""Security: no code runs from a model file, no pickle in the project's formats, and manifest
paths stay inside ``--root`` when the user asks for it.

Also proven elsewhere (marked ``reliability``): tests/convert/test_manifest.py
(``test_missing_manifest_and_root_escape``: a ``../`` path).
"""

import ast
import copy
import json
import os
import pathlib
import zipfile

import keras
import pytest
import tensorflow as tf

from kd_histo import schema
from kd_histo.convert import ConvertConfig, EncodeOptions, convert
from kd_histo.convert.manifest import ManifestError, read_manifest
from kd_histo.data.pipeline import PipelineConfig
from kd_histo.models import build_model, load_model
from kd_histo.training import preflight, train
from kd_histo.training.config import DistillConfig, NetConfig, RunConfig

from .helpers import REPO, encoded, rgb, write

pytestmark = pytest.mark.reliability

PACKAGE_SOURCES = sorted(
    [*pathlib.Path(REPO, "kd_histo").rglob("*.py"), *pathlib.Path(REPO, "tools").rglob("*.py")]
)


def _evil_lambda_model(path, marker):
    inputs = keras.Input((None, None, 3))
    touched = keras.layers.Lambda(lambda t: (open(marker, "w").close(), t)[1])(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(touched)
    net = keras.Model(inputs, {"logits": keras.layers.Dense(4)(pooled), "features": touched})
    net.save(path)
    os.remove(marker)  # building the model ran the lambda once; loading must not
    return str(path)


def test_a_lambda_layer_in_a_model_file_is_refused_and_never_runs(tiny_shards, tmp_path):
    marker = str(tmp_path / "code_ran")
    path = _evil_lambda_model(tmp_path / "evil.keras", marker)
    message = (
        f"{path}: refused, it holds Python code that Keras safe_mode will not run (Requested the "
        "deserialization of a `Lambda` layer whose `function` is a Python lambda); kd_histo nets "
        "hold none: rebuild it with kd_histo.models"
    )
    with pytest.raises(ValueError) as err:
        load_model(path)
    assert str(err.value) == message
    cfg = RunConfig(
        mode="distill",
        model_dir=str(tmp_path / "run"),
        data=PipelineConfig(tiny_shards, batch_size=4),
        net=NetConfig(planes=(4, 8, 8, 16)),
        distill=DistillConfig(teacher=path),
    )
    with pytest.raises(preflight.PreflightError) as err:
        train.train(cfg)
    assert str(err.value) == f"teacher: {message}"
    assert not os.path.exists(marker) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["model", "layer"])
def test_a_model_file_naming_a_non_keras_callable_is_refused(tmp_path, where):
    net = build_model("resnet_gn", 4, mean=[0.5] * 3, std=[0.25] * 3, planes=(4, 8, 8, 16))
    net.save(tmp_path / "net.keras")
    with zipfile.ZipFile(tmp_path / "net.keras") as z:
        files = {n: z.read(n) for n in z.namelist()}
    config = json.loads(files["config.json"])
    evil = copy.deepcopy(config)
    target = evil if where == "model" else evil["config"]["layers"][1]
    marker = tmp_path / "code_ran"
    target.update(module="os", class_name="system", config=f"touch {marker}")
    path = str(tmp_path / "evil.keras")
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, json.dumps(evil) if name == "config.json" else data)
    with pytest.raises(ValueError) as err:
        load_model(path)
    assert str(err.value).startswith(f"{path} is not a loadable Keras model (TypeError: ")
    assert not marker.exists()


BANNED_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
}


def _problems(source: str, where: str) -> list[str]:
    """Pickle imports, pickle-enabled loads and Keras loads without safe_mode in one file."""
    problems = []
    for node in ast.walk(ast.parse(source, where)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module.split(".")[0]]
        problems += [f"{where}:{node.lineno}: imports {n}" for n in names if n in BANNED_MODULES]
        if isinstance(node, ast.Attribute) and node.attr == "enable_unsafe_deserialization":
            problems.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if kw.get("allow_pickle") not in (None, "False"):
            problems.append(f"{where}:{node.lineno}: {func}(allow_pickle={kw['allow_pickle']})")
        # keras.saving.load_model / keras.models.load_model; the project's own load_model
        # (kd_histo.models) sets safe_mode=True itself.
        if func.endswith(".load_model") and kw.get("safe_mode") != "True":
            problems.append(f"{where}:{node.lineno}: {func} without safe_mode=True")
    return problems


def test_no_pickle_and_no_unsafe_loading_in_the_project_source():
    assert _problems(  # the scan finds what it looks for
        "import pickle\nfrom joblib import load\nkeras.saving.load_model(p)\n"
        "keras.models.load_model(p, safe_mode=False)\nnp.load(f, allow_pickle=True)\n"
        "keras.config.enable_unsafe_deserialization()\nload_model(p)\n",
        "x.py",
    ) == [
        "x.py:1: imports pickle",
        "x.py:2: imports joblib",
        "x.py:3: keras.saving.load_model without safe_mode=True",
        "x.py:4: keras.models.load_model without safe_mode=True",
        "x.py:5: np.load(allow_pickle=True)",
        "x.py:6: keras.config.enable_unsafe_deserialization",
    ]
    assert len(PACKAGE_SOURCES) > 30  # the scan sees the package
    problems = []
    for path in PACKAGE_SOURCES:
        problems += _problems(path.read_text(), os.path.relpath(path, REPO))
    assert problems == []


def test_the_project_formats_are_json_tfrecord_and_keras_zip(tmp_path):
    for i, c in enumerate(("a", "b")):
        write(tmp_path / "in" / c / f"{c}.png", encoded(rgb(i), "PNG"))
    convert(
        ConvertConfig(
            out_dir=str(tmp_path / "out"),
            input_dir=str(tmp_path / "in"),
            fractions=(1, 0, 0),
            keep_parts=True,
            encode=EncodeOptions(tile_px=16),
        )
    )
    seen = set()
    for path in sorted((tmp_path / "out").rglob("*")):
        if path.is_dir():
            continue
        if path.name.endswith(".json"):
            json.loads(path.read_text())  # dataset.json, part summaries, the config fingerprint
            seen.add("json")
        else:
            assert path.suffix == ".tfrecord", path
            for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
                schema.parse_example_numpy(raw)  # a tf.train.Example of this schema
            seen.add("tfrecord")
    assert seen == {"json", "tfrecord"}
    net = build_model("resnet_gn", 2, mean=[0.5] * 3, std=[0.25] * 3, planes=(4, 8, 8, 16))
    net.save(tmp_path / "net.keras")
    with zipfile.ZipFile(tmp_path / "net.keras") as z:
        assert sorted(z.namelist()) == ["config.json", "metadata.json", "model.weights.h5"]
        json.loads(z.read("config.json"))


def _manifest(tmp_path, rows, name="m.csv"):
    path = tmp_path / "root" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("path,label\n" + "".join(f"{r},x\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "case", ["absolute", "sibling_prefix", "symlinked_file", "symlinked_folder"]
)
def test_manifest_paths_cannot_escape_root(tmp_path, case):
    root = tmp_path / "root"
    root.mkdir()
    outside = write(tmp_path / "root2" / "x.png", encoded(rgb(0), "PNG"))
    row = {
        "absolute": outside,
        "sibling_prefix": "../root2/x.png",  # shares the root's name as a prefix
        "symlinked_file": "inside.png",
        "symlinked_folder": "sub/x.png",
    }[case]
    os.symlink(outside, root / "inside.png")
    os.symlink(tmp_path / "root2", root / "sub")
    manifest = _manifest(tmp_path, ["ok.png", row])
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest, root=str(root))
    assert (
        str(err.value)
        == f"{manifest}:3: {row} lies outside --root={root}; fix the path or the root"
    )
    assert len(read_manifest(manifest)) == 2  # confinement is asked for, not imposed


def test_root_confinement_applies_to_slide_labels_and_the_cli(tmp_path, capsys):
    from kd_histo.cli import convert as cli
    from kd_histo.cli import flags_common as fc

    root = tmp_path / "root"
    manifest = _manifest(tmp_path, ["../elsewhere/slide.svs"], name="slides.csv")
    with pytest.raises(
        ManifestError, match=r"slides.csv:2: ../elsewhere/slide.svs lies outside --root="
    ):
        convert(ConvertConfig(out_dir=str(tmp_path / "o"), slide_labels=manifest, root=str(root)))
    argv = [
        f"--manifest={manifest}",
        f"--root={root}",
        f"--out_dir={tmp_path / 'o2'}",
        "--progress=false",
    ]
    assert fc.invoke(cli.PROG, cli.main, argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"kd-histo-convert: error: {manifest}:2: ../elsewhere/slide.svs lies outside "
        f"--root={root}; "
        "fix the path or the root"
    )
    assert os.listdir(tmp_path / "o2") == []  # no parts left to refuse the corrected rerun
    argv[1] = f"--root={tmp_path / 'nowhere'}"
    assert fc.invoke(cli.PROG, cli.main, argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"kd-histo-convert: error: --root={tmp_path / 'nowhere'} is not a folder; "
        "pass the folder paths must stay in"
    )


def test_ids_in_a_manifest_never_become_file_paths(tmp_path):
    root = tmp_path / "root"
    write(root / "a.png", encoded(rgb(1), "PNG"))
    write(root / "b.png", encoded(rgb(2), "PNG"))
    manifest = root / "m.csv"
    manifest.write_text(
        "path,label,slide_id,patient_id\na.png,x,../../escaped,../p\nb.png,y,/tmp/abs,p2\n"
    )
    before = sorted(p for p in tmp_path.rglob("*"))
    convert(
        ConvertConfig(
            out_dir=str(tmp_path / "out"),
            manifest=str(manifest),
            root=str(root),
            fractions=(1, 0, 0),
            encode=EncodeOptions(tile_px=16),
        )
    )
    new = sorted(p for p in tmp_path.rglob("*") if p not in before)
    assert new and all(p.is_relative_to(tmp_path / "out") for p in new)
    ids = sorted(schema.parse_example_numpy(r)["slide_id"] for r in _all_records(tmp_path / "out"))
    assert ids == [b"../../escaped", b"/tmp/abs"]  # kept as data, never used as a path


def _all_records(data_dir):
    for p in schema.shard_paths(str(data_dir), "train"):
        yield from tf.data.TFRecordDataset(p).as_numpy_iterator()
