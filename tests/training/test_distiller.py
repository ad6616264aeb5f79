"""ResolutionDistiller: frozen teacher, one loop, precision, accumulation, strategies, saving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import REPO

from kd_histo.models import build_model, load_model
from kd_histo.training import losses as L
from kd_histo.training.config import DistillConfig
from kd_histo.training.distiller import ResolutionDistiller, losses_for

KW = dict(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], planes=(4, 8, 8, 16), stem="small")


def nets(seed=0, classes=4, **kw):
    keras.utils.set_random_seed(seed)
    opts = {**KW, **kw}
    return build_model("resnet_gn", classes, name="student", **opts), build_model(
        "resnet_gn", classes, name="teacher", **opts
    )


def batch_dict(n=8, hr=32, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "hr": rng.random((n, hr, hr, 3), dtype=np.float32),
        "lr": rng.random((n, hr // 2, hr // 2, 3), dtype=np.float32),
        "label": np.array([0, 1, 2, 3, -1, -1, 0, 1] * (n // 8 or 1), dtype=np.int32)[:n],
    }


def dataset(n=16, batch=8, seed=0):
    return tf.data.Dataset.from_tensor_slices(batch_dict(n, seed=seed)).batch(batch)


def weights(**distill):
    """The distiller's losses for DistillConfig settings (the run config's defaults elsewhere)."""
    return losses_for(DistillConfig(**distill))


def snapshot(model):
    return [w.numpy().copy() for w in model.weights]


def test_distillation_fit_freezes_teacher_and_trains_student():
    student, teacher = nets()
    d = ResolutionDistiller(student, teacher, weights(ce_weight=0.5, ssl_weight=0.2, at_weight=0.3))
    d.compile(keras.optimizers.Adam(1e-2))
    t0, s0 = snapshot(teacher), snapshot(student)
    hist = d.fit(dataset(), epochs=2, verbose=0).history
    assert teacher.trainable is False
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(t0, teacher.weights)), (
        "teacher weights changed"
    )
    assert any(not np.array_equal(a, w.numpy()) for a, w in zip(s0, student.weights)), (
        "student did not learn"
    )
    names = ("loss", "kd_loss", "feature_loss", "ce_loss", "ssl_loss", "at_loss")
    assert d.loss_names == names and set(hist) == set(names) | {"accuracy"}
    for name in names:
        assert np.all(np.isfinite(hist[name])), name
        assert hist[name][-1] > 0, f"{name} inactive although its weight is > 0"
    assert not any(id(w) in {id(t) for t in teacher.weights} for w in d.trainable_weights)


def test_losses_match_pure_functions_and_total_is_weighted_sum():
    student, teacher = nets()
    d = ResolutionDistiller(
        student,
        teacher,
        weights(
            temperature=3.0,
            kd_weight=0.7,
            feature_weight=2.0,
            ce_weight=0.5,
            feature_mode="bicubic",
            feature_norm="l1",
        ),
    )
    b = batch_dict()
    parts, out = d.compute_losses(b)
    t = teacher(b["hr"], training=False)
    np.testing.assert_allclose(
        parts["kd_loss"], L.kd_kl(t["logits"], out["logits"], 3.0), rtol=1e-6
    )
    np.testing.assert_allclose(
        parts["feature_loss"],
        L.feature_map_loss(out["features"], t["features"], "bicubic", "l1"),
        rtol=1e-6,
    )
    np.testing.assert_allclose(parts["ce_loss"], L.masked_ce(b["label"], out["logits"]), rtol=1e-6)
    expected = 0.7 * parts["kd_loss"] + 2.0 * parts["feature_loss"] + 0.5 * parts["ce_loss"]
    np.testing.assert_allclose(parts["loss"], expected, rtol=1e-6)


def test_cached_and_live_teacher_feed_the_same_loss_objects():
    student, teacher = nets()
    seen = []

    class Spy(L.FeatureMapKD):
        def compute_loss(self, teacher_outputs, student_outputs, **kw):
            seen.append((id(self), tuple(teacher_outputs["features"].shape[1:3])))
            return super().compute_loss(teacher_outputs, student_outputs, **kw)

    feature = Spy("bicubic", "l1")
    d = ResolutionDistiller(student, teacher, [(0.7, L.LogitsKD(3.0)), (2.0, feature)])
    b = batch_dict()
    t = teacher(b["hr"], training=False)
    size = student(b["lr"])["features"].shape[1:3]
    cached = dict(
        b, teacher_logits=t["logits"], teacher_features=feature.target(t["features"], size)
    )
    live, _ = d.compute_losses(b)
    from_cache, _ = d.compute_losses(cached)
    assert seen == [(id(feature), tuple(t["features"].shape[1:3])), (id(feature), tuple(size))]
    assert set(live) == set(from_cache) == {"loss", "kd_loss", "feature_loss"}
    for name in live:
        np.testing.assert_allclose(from_cache[name], live[name], rtol=1e-5)


def test_losses_are_validated_when_the_distiller_is_built():
    student, _ = nets(planes=(4, 8, 8, 16))
    _, wide = nets(planes=(4, 8, 8, 32))
    with pytest.raises(ValueError, match="has 32 channels but its parts add up to 16"):
        ResolutionDistiller(student, wide, [(1.0, L.FeatureMapKD(splits=(8, 8)))])
    d = ResolutionDistiller(student, wide, [(1.0, L.LogitsKD()), (0.0, L.FeatureMapKD())])
    assert d.loss_names == ("loss", "kd_loss")  # weight 0: neither checked nor tracked
    with pytest.raises(ValueError, match="weights must be >= 0"):
        ResolutionDistiller(student, wide, [(-1.0, L.LogitsKD())])
    with pytest.raises(ValueError, match="every loss weight is 0"):
        ResolutionDistiller(student, wide, [(0.0, L.LogitsKD())])
    with pytest.raises(ValueError, match="kd_weight"):  # the weight keywords are gone
        ResolutionDistiller(student, wide, kd_weight=1.0)


def test_cached_teacher_outputs_replace_the_teacher():
    student, teacher = nets()
    b = batch_dict()
    t = teacher(b["hr"], training=False)
    size = student(b["lr"])["features"].shape[1:3]
    cached = dict(
        b, teacher_logits=t["logits"], teacher_features=L.resize_teacher_map(t["features"], size)
    )
    with_teacher, _ = ResolutionDistiller(student, teacher).compute_losses(b)
    from_cache, _ = ResolutionDistiller(student, None).compute_losses(cached)
    for name in ("kd_loss", "feature_loss", "loss"):
        np.testing.assert_allclose(from_cache[name], with_teacher[name], rtol=1e-5)


@pytest.mark.parametrize("view", ["hr", "lr"])
def test_supervised_without_teacher_is_the_same_loop(view):
    student, _ = nets()
    d = ResolutionDistiller(student, None, [(1.0, L.MaskedCE())], student_view=view)
    d.compile(keras.optimizers.Adam(1e-2))
    hist = d.fit(dataset(), epochs=3, verbose=0).history
    assert set(hist) == {"loss", "ce_loss", "accuracy"}  # no columns for the inactive losses
    np.testing.assert_allclose(hist["loss"], hist["ce_loss"])
    assert hist["ce_loss"][-1] < hist["ce_loss"][0]
    preds = d.predict(batch_dict(), verbose=0)
    assert preds["logits"].shape == (8, 4)


def test_accuracy_counts_labeled_examples_only():
    student, _ = nets()
    d = ResolutionDistiller(student, None, [(1.0, L.MaskedCE())])
    d.compile("adam")
    b = batch_dict()
    metrics = d.evaluate(tf.data.Dataset.from_tensors(b), verbose=0, return_dict=True)
    pred = np.argmax(student(b["lr"])["logits"].numpy(), -1)
    lab = b["label"]
    assert metrics["accuracy"] == pytest.approx(np.mean(pred[lab >= 0] == lab[lab >= 0]))


def test_clear_errors():
    student, _ = nets(classes=4)
    _, teacher3 = nets(classes=3)
    with pytest.raises(ValueError, match="teacher has 3 classes but student has 4"):
        ResolutionDistiller(student, teacher3)
    _, wide = nets(planes=(4, 8, 8, 32))
    # widths differ: the feature loss goes through a learned projection (its own tests:
    # tests/training/test_feature_projection.py); without the feature loss there is none
    assert len(ResolutionDistiller(student, wide).feature_projections) == 1
    assert not hasattr(
        ResolutionDistiller(student, wide, weights(feature_weight=0.0)), "feature_projections"
    )
    with pytest.raises(ValueError, match="channels: student 16, teacher 32"):
        L.FeatureMapKD().compute_loss(wide.output, student.output)
    with pytest.raises(ValueError, match="nothing to learn"):
        ResolutionDistiller(student, None).compute_losses(batch_dict())
    with pytest.raises(ValueError, match="loss="):
        ResolutionDistiller(student, None, weights(ce_weight=1.0)).compile("adam", loss="mse")
    with pytest.raises(FileNotFoundError, match="teacher.keras not found"):
        load_model("/nonexistent/teacher.keras")


def test_gradient_accumulation_equals_one_large_batch():
    # kd + feature losses are per-example means and GroupNorm has no batch statistics, so two
    # accumulated micro-batches of 4 must give the update of one batch of 8.
    b = batch_dict(8)
    results = []
    for steps, bs in ((1, 8), (2, 4)):
        student, teacher = nets(seed=1)
        d = ResolutionDistiller(student, teacher, accumulation_steps=steps)
        d.compile(keras.optimizers.SGD(0.5))
        w0 = snapshot(student)
        d.fit(tf.data.Dataset.from_tensor_slices(b).batch(bs), epochs=1, verbose=0, shuffle=False)
        results.append((w0, snapshot(student)))
    (w0, one), (_, acc) = results
    assert any(not np.array_equal(a, b) for a, b in zip(w0, one))
    for a, b_ in zip(one, acc):
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-6)


def test_accumulation_waits_for_the_last_micro_batch():
    student, teacher = nets()
    d = ResolutionDistiller(student, teacher, accumulation_steps=2)
    d.compile(keras.optimizers.SGD(0.5))
    w0 = snapshot(student)
    d.fit(dataset(8, 8), epochs=1, verbose=0)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(w0, student.weights))
    d.fit(dataset(8, 8), epochs=1, verbose=0)
    assert any(not np.array_equal(a, w.numpy()) for a, w in zip(w0, student.weights))


@pytest.fixture
def restore_policy():
    before = keras.mixed_precision.dtype_policy()
    yield
    keras.mixed_precision.set_dtype_policy(before)


@pytest.mark.parametrize(
    "policy,compute", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")]
)
def test_mixed_precision(policy, compute, restore_policy):
    keras.mixed_precision.set_dtype_policy(policy)
    student, teacher = nets()
    d = ResolutionDistiller(student, teacher, weights(ce_weight=0.5, ssl_weight=0.1, at_weight=0.1))
    d.compile(keras.optimizers.Adam(1e-2))
    conv = student.get_layer("stage1_block1_conv1")
    assert conv.compute_dtype == compute and conv.kernel.dtype == "float32"
    assert all(w.dtype == "float32" for w in student.trainable_weights)
    out = student(batch_dict()["lr"])
    assert out["logits"].dtype == "float32" and out["features"].dtype == compute
    if policy == "mixed_float16":
        assert isinstance(d.optimizer, keras.optimizers.LossScaleOptimizer)
    t0, s0 = snapshot(teacher), snapshot(student)
    hist = d.fit(dataset(), epochs=1, verbose=0).history
    assert all(np.isfinite(hist[n][0]) for n in d.loss_names) and len(d.loss_names) == 6
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(t0, teacher.weights))
    assert any(not np.array_equal(a, w.numpy()) for a, w in zip(s0, student.weights))


def test_save_load_round_trips(tmp_path):
    student, teacher = nets()
    d = ResolutionDistiller(student, teacher, weights(ce_weight=0.5))
    d.compile(keras.optimizers.Adam(1e-2))
    d.fit(dataset(), epochs=1, verbose=0)
    b = batch_dict()
    expected = student(b["lr"])["logits"].numpy()
    # the student alone, as .keras (safe mode) ...
    student.save(str(tmp_path / "student.keras"))
    np.testing.assert_array_equal(
        load_model(str(tmp_path / "student.keras"), 4)(b["lr"])["logits"].numpy(), expected
    )
    # ... as a SavedModel for serving ...
    student.export(str(tmp_path / "savedmodel"), verbose=False)
    reloaded = tf.saved_model.load(
        str(tmp_path / "savedmodel")
    )  # keep a reference: it owns the variables
    served = reloaded.serve(tf.constant(b["lr"]))
    np.testing.assert_allclose(served["logits"].numpy(), expected, rtol=1e-5, atol=1e-6)
    # ... and the whole distiller with its config.
    d.save(str(tmp_path / "distiller.keras"))
    d2 = keras.saving.load_model(str(tmp_path / "distiller.keras"), safe_mode=True)
    assert [(w, loss.name) for w, loss in d2.loss_terms] == [
        (1.0, "kd_loss"),
        (1.0, "feature_loss"),
        (0.5, "ce_loss"),
    ]
    assert d2.teacher.trainable is False
    np.testing.assert_array_equal(d2.predict(b, verbose=0)["logits"], expected)
    # ... compiled again with its optimizer and that optimizer's state, ready to go on training.
    assert d2.compiled and isinstance(d2.optimizer, keras.optimizers.Adam)
    assert float(d2.optimizer.learning_rate) == pytest.approx(1e-2)
    assert int(d2.optimizer.iterations) == int(d.optimizer.iterations) > 0
    d2.fit(dataset(), epochs=1, verbose=0)


_MIRRORED = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    sys.path.insert(0, "tests")
    from training.test_distiller import nets, batch_dict, snapshot, weights
    from kd_histo.training.distiller import ResolutionDistiller

    def run(strategy):
        with strategy.scope():
            student, teacher = nets(seed=3)
            # ce stays off: it averages over each replica's labeled examples, not the global ones.
            d = ResolutionDistiller(student, teacher, weights(at_weight=0.5))
            d.compile(keras.optimizers.SGD(0.5))
        t0 = snapshot(teacher)
        # string fields as in pipeline batches (Keras' own symbolic build cannot all-reduce them)
        ds = tf.data.Dataset.from_tensor_slices(dict(batch_dict(8), slide_id=["s"] * 8)).batch(8)
        hist = d.fit(ds, epochs=1, verbose=0).history
        same_teacher = all(np.array_equal(a, w.numpy()) for a, w in zip(t0, teacher.weights))
        return hist, snapshot(student), same_teacher, strategy.num_replicas_in_sync

    h1, w1, t1, n1 = run(tf.distribute.get_strategy())
    h2, w2, t2, n2 = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(w1, w2))
    print(json.dumps({"replicas": [n1, n2], "teacher_frozen": t1 and t2, "max_weight_diff": diff,
                      "loss": [h1["loss"][0], h2["loss"][0]]}))
""")


def test_mirrored_strategy_two_logical_cpus_matches_one_device():
    # Logical devices must be set before TF initialises, hence a fresh interpreter.
    proc = subprocess.run(
        [sys.executable, "-c", _MIRRORED],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["replicas"] == [1, 2] and res["teacher_frozen"]
    # The loss is divided by the replica count before the all-reduce sum: same update as one device.
    assert res["max_weight_diff"] < 1e-4, res
    np.testing.assert_allclose(res["loss"][0], res["loss"][1], rtol=1e-4)


_WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow as tf
    # reads TF_CONFIG; created before any other TF op
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras
    sys.path.insert(0, "tests")
    from training.test_distiller import nets, batch_dict
    from kd_histo.training.distiller import ResolutionDistiller
    with strategy.scope():
        student, teacher = nets(seed=5)
        d = ResolutionDistiller(student, teacher)
        d.compile(keras.optimizers.SGD(0.5))
    ds = tf.data.Dataset.from_tensor_slices(batch_dict(16)).batch(8)
    hist = d.fit(ds, epochs=1, verbose=0).history
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "loss": hist["loss"][0],
                      "checksum": float(sum(np.abs(w.numpy()).sum()
                                            for w in student.trainable_weights))}))
""")


def test_multi_worker_mirrored_two_local_workers():
    """TF_CONFIG-driven MultiWorkerMirroredStrategy with two local worker processes (~10 s)."""
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            ports.append(s.getsockname()[1])
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "TF_CPP_MIN_LOG_LEVEL": "2",
                "TF_CONFIG": json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": i}}
                ),
            },
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    res = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [r["replicas"] for r in res] == [2, 2]
    assert np.isfinite(res[0]["loss"])
    # all-reduced gradients: both workers end with the same student
    assert res[0]["checksum"] == pytest.approx(res[1]["checksum"], rel=1e-6)
