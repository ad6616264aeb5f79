"""Embedding-only teachers (issue 28, Deliver 2): a model from elsewhere without a classifier head
(teacher.json names ``features`` and no ``logits``) distils label-free into a student whose head
is then fit on the labeled train tiles; the saved student is the plain net."""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import numpy as np
import pytest

from kd_histo import schema
from kd_histo.data.pipeline import PipelineConfig, make_dataset
from kd_histo.evaluation.cost import count_flops
from kd_histo.models import build_model, load_model
from kd_histo.training import embedding_run, foreign, preflight, train
from kd_histo.training.config import DistillConfig, NetConfig, RunConfig
from kd_histo.training.distiller import ResolutionDistiller
from kd_histo.training.embedding import EmbeddingKD, embedding_distance
from kd_histo.training.run_record import read_run_record

PLANES = (4, 8, 8, 16)
EMB = 10


def _about(**facts) -> dict:
    about = {"input_px": 32, "mpp": 0.5, "features": "embedding", "mean": [0.5] * 3,
             "std": [0.25] * 3}  # fmt: skip
    about.update(facts)
    return {k: v for k, v in about.items() if v is not None}


def _embedding_savedmodel(folder, **facts) -> str:
    """A foundation model in miniature: a conv trunk and a [B, D] embedding, no classifier."""
    keras.utils.set_random_seed(5)
    image = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(image)
    x = keras.layers.GlobalAveragePooling2D()(x)
    emb = keras.layers.Dense(EMB)(x)
    path = os.path.join(str(folder), "foundation_sm")
    keras.Model(image, {"embedding": emb}).export(path, verbose=False)
    with open(os.path.join(path, "teacher.json"), "w") as f:
        json.dump(_about(**facts), f)
    return path


def _run(data_dir, model_dir, teacher, **distill):
    return RunConfig(
        mode="distill",
        model_dir=str(model_dir),
        data=PipelineConfig(data_dir, batch_size=4, factor=2, augment="flips"),
        net=NetConfig(planes=PLANES, stem="small"),
        distill=DistillConfig(teacher=teacher, **distill),
        epochs=1,
        steps_per_epoch=2,
        val_steps=1,
        verbose=0,
        profile_steps=(0, 0),
        image_grids=False,
    )


@pytest.mark.parametrize("kind", ["cosine", "l2"])
def test_embedding_distance_matches_numpy(kind):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 7)), rng.normal(size=(5, 7)) * 3
    got = float(embedding_distance(s.astype(np.float32), t.astype(np.float32), kind))
    if kind == "l2":
        want = np.mean((s - t) ** 2)
    else:
        cos = (s * t).sum(1) / np.linalg.norm(s, axis=1) / np.linalg.norm(t, axis=1)
        want = np.mean(1 - cos)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(embedding_distance(t, t, kind)) == pytest.approx(0, abs=1e-6)


def test_embedding_loss_projects_the_pooled_student_map():
    keras.utils.set_random_seed(0)
    student = build_model("resnet_gn", 4, mean=[0.5] * 3, std=[0.25] * 3, planes=PLANES)
    loss = EmbeddingKD("cosine")
    (proj,) = loss.build({"features": keras.KerasTensor((None, EMB))}, student.output).values()
    s = np.random.default_rng(1).normal(size=(3, 2, 2, PLANES[-1])).astype(np.float32)
    t = np.random.default_rng(2).normal(size=(3, EMB)).astype(np.float32)
    got = float(loss.compute_loss({"features": t}, {"features": s}))
    p = s.mean(axis=(1, 2)) @ proj.kernel.numpy() + proj.bias.numpy()
    cos = (p * t).sum(1) / np.linalg.norm(p, axis=1) / np.linalg.norm(t, axis=1)
    np.testing.assert_allclose(got, np.mean(1 - cos), rtol=1e-5)


def test_linear_head_separates_and_reads_raw_features():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = rng.normal(size=(120, 4)) + 4 * np.eye(3, 4)[y]
    scale = np.array([1.0, 100.0, 0.01, 5.0])
    k, b = embedding_run.fit_linear_head(x, y, 3)
    ks, bs = embedding_run.fit_linear_head(x * scale + 7, y, 3)
    assert embedding_run.accuracy(x, y, k, b) == 1.0
    # the fit sees standardised features: rescaled inputs give the same head on raw features
    np.testing.assert_allclose(x @ k + b, (x * scale + 7) @ ks + bs, rtol=1e-3, atol=1e-3)


def test_a_mapped_embedding_teacher_is_pooled(tiny_shards, tmp_path):
    keras.utils.set_random_seed(4)
    image = keras.Input((None, None, 3))
    fmap = keras.layers.Conv2D(6, 3, strides=4, padding="same")(image)
    model = keras.Model(image, [fmap])
    path = str(tmp_path / "fm.keras")
    model.save(path)
    (tmp_path / "teacher.json").write_text(json.dumps(_about(features="0", mean=None, std=None)))
    cfg = _run(tiny_shards, tmp_path / "s", path, teacher_cache="")
    net = preflight.load_teacher(cfg, preflight.check_data(cfg))
    x = np.random.default_rng(1).random((2, 32, 32, 3), dtype=np.float32)
    np.testing.assert_allclose(
        net(x)["features"].numpy(), model(x).numpy().mean(axis=(1, 2)), rtol=1e-5, atol=1e-6
    )


@pytest.fixture(scope="module")
def embedded_run(tiny_shards, tmp_path_factory):
    folder = tmp_path_factory.mktemp("embedding")
    teacher = _embedding_savedmodel(folder)
    cfg = _run(tiny_shards, folder / "student", teacher)
    return cfg, train.train(cfg)


def test_an_embedding_teacher_trains_a_student_and_its_heads(embedded_run, tiny_shards):
    cfg, result = embedded_run
    assert "kd_loss" not in result.history and "feature_loss" not in result.history
    assert all(np.isfinite(result.history["embed_loss"])) and min(result.history["embed_loss"]) > 0
    record = read_run_record(result.model_dir)
    probe = record.linear_probe
    info = schema.DatasetInfo.read(tiny_shards)
    labeled = sum(n for c, n in info.counts["train"].items() if c != "unlabeled")
    assert probe.train_tiles == labeled and probe.val_tiles > 0 and probe.embedding_loss == "cosine"
    for acc in (probe.student_train_accuracy, probe.teacher_train_accuracy,
                probe.student_val_accuracy, probe.teacher_val_accuracy):  # fmt: skip
        assert 0.0 <= acc <= 1.0
    # the saved student carries the fitted head: its accuracy on the train tiles is the record's
    saved = load_model(os.path.join(result.model_dir, "model.keras"), 4)
    plain = dataclasses.replace(cfg.data, batch_size=64, normalize=False, labeled=True)
    hits = n = 0
    for batch in make_dataset(plain, "train", training=False):
        y = batch["label"].numpy()
        pred = saved(batch["lr"])["logits"].numpy().argmax(1)
        hits, n = hits + int((pred == y)[y >= 0].sum()), n + int((y >= 0).sum())
    assert n == probe.train_tiles and hits / n == pytest.approx(probe.student_train_accuracy)
    head = np.load(os.path.join(result.model_dir, probe.teacher_head))
    assert head["kernel"].shape == (EMB, 4) and head["bias"].shape == (4,)


def test_the_saved_student_has_no_projection_and_the_plain_cost(embedded_run):
    _, result = embedded_run
    saved = load_model(os.path.join(result.model_dir, "model.keras"))
    names = [layer.name for layer in saved._flatten_layers()]
    assert not [n for n in names if "projection" in n]
    plain = build_model("resnet_gn", 4, mean=[0.5] * 3, std=[0.25] * 3, planes=PLANES,
                        stem="small")  # fmt: skip
    assert saved.count_params() == plain.count_params()
    assert count_flops(saved, 16) == count_flops(plain, 16) > 0
    assert set(saved.output) == {"logits", "features"}


def test_the_distiller_owns_and_trains_the_projection(tmp_path):
    keras.utils.set_random_seed(0)
    student = build_model("resnet_gn", 4, mean=[0.5] * 3, std=[0.25] * 3, planes=PLANES,
                          stem="small")  # fmt: skip
    image = keras.Input((None, None, 3))
    emb = keras.layers.Dense(EMB)(keras.layers.GlobalAveragePooling2D()(image))
    teacher = keras.Model(image, {"features": emb})
    d = ResolutionDistiller(student, teacher, [(1.0, EmbeddingKD("l2"))])
    before = d.embedding_projection.kernel.numpy().copy()
    d.compile(keras.optimizers.Adam(1e-2))
    rng = np.random.default_rng(0)
    b = {"hr": rng.random((4, 16, 16, 3), np.float32), "lr": rng.random((4, 8, 8, 3), np.float32)}
    logs = [float(d.train_on_batch(b, return_dict=True)["embed_loss"]) for _ in range(4)]
    assert logs[-1] < logs[0]
    assert not np.array_equal(before, d.embedding_projection.kernel.numpy())
    assert len(d.trainable_weights) == len(student.trainable_weights) + 2


@pytest.mark.parametrize(
    "facts, words",
    [
        ({"mpp": 1.0}, "was trained on 1 µm/px tiles"),
        ({"input_px": 64}, "was trained on 64 px HR tiles"),
        ({"features": "emb"}, "features 'emb' is not an output"),
        ({"class_names": ["a", "b"]}, "none for an embedding-only teacher"),
    ],
)
def test_an_embedding_teacher_json_that_does_not_fit_is_refused_in_one_line(
    tiny_shards, tmp_path, facts, words
):
    teacher = _embedding_savedmodel(tmp_path, **facts)
    cfg = _run(tiny_shards, tmp_path / "s", teacher)
    with pytest.raises(preflight.PreflightError, match=words) as e:
        train.train(cfg)
    assert foreign.teacher_json(teacher) in str(e.value)
    assert "\n" not in str(e.value) and not os.path.exists(cfg.model_dir)


@pytest.mark.parametrize(
    "distill, words",
    [
        ({"teacher_cache": "auto"}, "drop --teacher_cache"),
        ({"twice": True}, "ensemble member"),
        ({"nolabeled": True}, "drop --nolabeled"),
    ],
)
def test_what_an_embedding_teacher_cannot_do_is_refused(tiny_shards, tmp_path, distill, words):
    teacher = _embedding_savedmodel(tmp_path)
    twice, nolabeled = distill.pop("twice", False), distill.pop("nolabeled", False)
    cfg = _run(tiny_shards, tmp_path / "s", f"{teacher},{teacher}" if twice else teacher, **distill)
    if nolabeled:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, labeled=False))
    with pytest.raises(preflight.PreflightError, match=words) as e:
        train.train(cfg)
    assert "\n" not in str(e.value) and not os.path.exists(cfg.model_dir)


def test_evaluation_reports_both_heads_on_the_split(embedded_run, tiny_shards, tmp_path, capsys):
    from kd_histo.cli import evaluate as evaluate_cli
    from kd_histo.cli import flags_common as fc

    cfg, result = embedded_run
    assert read_run_record(result.model_dir).monitor == "val_loss"  # the head is fit after
    out = tmp_path / "eval"
    argv = [f"--model_dir={result.model_dir}", "--split=test", "--n_boot=5", f"--out_dir={out}"]
    assert fc.invoke(evaluate_cli.PROG, evaluate_cli.main, argv) == 0
    assert "linear heads on test: student" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    p = m["linear_probe"]
    assert p["student_accuracy"] == m["tile"]["accuracy"] and p["tiles"] == m["tile"]["n"] > 0
    # the teacher's probe: its embedding of the test HR tiles through teacher_probe.npz
    raw = keras.layers.TFSMLayer(cfg.distill.teacher, call_endpoint="serve")
    head = np.load(os.path.join(result.model_dir, "teacher_probe.npz"))
    hits = 0
    for b in make_dataset(PipelineConfig(tiny_shards, batch_size=16), "test", training=False):
        emb = raw((b["hr"].numpy() - 0.5) / 0.25)["embedding"].numpy()
        hits += int(((emb @ head["kernel"] + head["bias"]).argmax(1) == b["label"].numpy()).sum())
    assert p["teacher_accuracy"] == pytest.approx(hits / p["tiles"])


def test_the_embedding_loss_setting_reaches_the_loss():
    keras.utils.set_random_seed(0)
    student = build_model("resnet_gn", 4, mean=[0.5] * 3, std=[0.25] * 3, planes=PLANES,
                          stem="small")  # fmt: skip
    image = keras.Input((None, None, 3))
    teacher = keras.Model(image, {"features": keras.layers.GlobalAveragePooling2D()(image)})
    d = embedding_run.distiller(student, teacher, DistillConfig(embedding_loss="l2"))
    assert [(w, loss.name, loss.kind) for w, loss in d.loss_terms] == [(1.0, "embed_loss", "l2")]
    assert not student.get_layer("head").trainable  # label-free: fit after, not trained
    with pytest.raises(ValueError, match="embedding_loss 'l1' unknown"):
        DistillConfig(embedding_loss="l1")
