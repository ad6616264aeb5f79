"""A foreign teacher (a model from elsewhere with a teacher.json naming its logits) as the
cascade's teacher (issue 28, Deliver 2): kd-histo-evaluate and kd-histo-predict re-score tiles
with it; one that does not fit, or has no logits, is refused in one line."""

from __future__ import annotations

import csv
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import SYNTHETIC_NAMES, run_record

from kd_histo.evaluation import evaluate, predict
from kd_histo.evaluation.teachers import check_teacher_runs
from kd_histo.models import build_model
from kd_histo.training.run_record import write_run_record

NAMES = SYNTHETIC_NAMES
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def _student(root, data_dir="") -> str:
    r = run_record(mean=MEAN, std=STD, data_dir=data_dir)
    d = os.path.join(str(root), "student")
    os.makedirs(d)
    keras.utils.set_random_seed(0)
    net = build_model("resnet_gn", 4, mean=MEAN, std=STD, planes=(4, 8, 8, 16), stem="small")
    net.save(os.path.join(d, "model.keras"))
    write_run_record(d, r)
    return d


def _foreign(root, kind: str = "keras", **facts):
    """(teacher path, the model): logits under its own name, normalised input."""
    keras.utils.set_random_seed(7)
    image = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(image)
    scores = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(image, {"scores": scores})
    folder = os.path.join(str(root), f"foreign_{kind}")
    os.makedirs(folder)
    path = os.path.join(folder, "net.keras")
    if kind == "keras":
        model.save(path)
    else:
        path = os.path.join(folder, "sm")
        model.export(path, verbose=False)
    about = {"input_px": 32, "mpp": 0.5, "class_names": list(NAMES), "logits": "scores",
             "mean": MEAN, "std": STD, **facts}  # fmt: skip
    with open(os.path.join(path if kind != "keras" else folder, "teacher.json"), "w") as f:
        json.dump({k: v for k, v in about.items() if v is not None}, f)
    return path, model


def _probs(model, x):
    return tf.nn.softmax(model((x - 0.5) / 0.25)["scores"]).numpy()


@pytest.mark.parametrize("kind", ["keras", "savedmodel"])
def test_evaluate_cascades_to_a_foreign_teacher(tmp_path, tiny_shards, kind):
    student = _student(tmp_path, tiny_shards)
    teacher, model = _foreign(tmp_path, kind)
    out = evaluate.evaluate_run(
        evaluate.EvalConfig(student, n_boot=10, cascade_teacher=teacher, cascade_fractions=(0.0,))
    )
    rows = json.load(open(out["cascade_json"]))["rows"]
    assert rows[-1]["scored_by"] == "teacher" and rows[-1]["gflops_per_tile"] > 0
    # the teacher alone: the foreign model's own argmax on the test split's HR tiles
    with open(out["predictions"]) as f:
        n = len(list(csv.DictReader(f)))
    from kd_histo.data.pipeline import PipelineConfig, make_dataset

    hits = 0
    for b in make_dataset(PipelineConfig(tiny_shards, batch_size=16), "test", training=False):
        hits += int((_probs(model, b["hr"]).argmax(1) == b["label"].numpy()).sum())
    assert rows[-1]["accuracy"] == pytest.approx(hits / n)


def test_predict_rescores_with_a_foreign_teacher(tmp_path):
    from PIL import Image

    from kd_histo.data import synthetic

    student = _student(tmp_path)
    teacher, model = _foreign(tmp_path, "savedmodel")
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    images, _, _ = synthetic.generate(2, 32, seed=4)  # 8 tiles, one group
    for i, im in enumerate(images):
        Image.fromarray(im).save(tiles / f"t{i}.png")
    out = predict.predict(
        predict.PredictConfig(
            student,
            (str(tiles),),
            out_dir=str(tmp_path / "c"),
            cascade_teacher=teacher,
            cascade_fraction=0.25,
        )  # fmt: skip
    )
    with open(out["predictions"]) as f:
        rows = list(csv.DictReader(f))
    by = np.array([r["scored_by"] == "teacher" for r in rows])
    p = np.array([[float(r[k]) for k in r if k.startswith("prob_")] for r in rows])
    assert by.sum() == 2  # a quarter of 8
    order = [int(os.path.splitext(r["source"])[0].rsplit("t", 1)[-1]) for r in rows]
    want = _probs(model, images[order].astype(np.float32) / 255.0)
    np.testing.assert_allclose(p[by], want[by], atol=2e-6)


@pytest.mark.parametrize(
    "facts, words",
    [
        ({"mpp": 1.0}, "trained at 1 µm/px"),
        ({"class_names": list(NAMES[::-1])}, "names and order"),
        ({"logits": None, "class_names": None, "features": "scores"}, "embedding-only"),
    ],
)
def test_a_foreign_cascade_teacher_that_does_not_fit_is_refused_in_one_line(tmp_path, facts, words):
    teacher, _ = _foreign(tmp_path, **facts)
    student = run_record(mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=words) as e:
        check_teacher_runs(teacher, student)
    assert "teacher.json" in str(e.value) and "\n" not in str(e.value)
