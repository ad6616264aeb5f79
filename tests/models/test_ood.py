"""Out-of-domain score: NumPy references (explicit loops), calibration, a shifted class flagged,
several terms combined, the single-term file of older runs."""

import json
import logging

import numpy as np
import pytest

from kd_histo.models import ood


def _clusters(rng, n, centres, spread=1.0):
    x = np.concatenate([c + rng.normal(0, spread, (n, len(c))) for c in centres])
    return x, np.repeat(np.arange(len(centres)), n)


def test_scores_match_an_explicit_loop_reference():
    rng = np.random.default_rng(0)
    x, y = _clusters(rng, 40, rng.normal(0, 3, (3, 5)))
    means, precision = ood.fit_gaussians(x, y, 3, shrinkage=0.0)
    ref_means = np.stack([x[y == k].mean(0) for k in range(3)])
    ref_cov = sum(np.outer(v - ref_means[k], v - ref_means[k]) for v, k in zip(x, y)) / len(x)
    np.testing.assert_allclose(means, ref_means)
    np.testing.assert_allclose(precision, np.linalg.inv(ref_cov), rtol=1e-8)
    queries = rng.normal(0, 4, (7, 5))
    ref = [min((q - m) @ np.linalg.inv(ref_cov) @ (q - m) for m in ref_means) for q in queries]
    np.testing.assert_allclose(ood.mahalanobis_min(queries, means, precision), ref, rtol=1e-8)


def test_threshold_flags_the_calibrated_fraction_of_validation():
    scores = np.arange(1, 201, dtype=float)
    t = ood.calibrate(scores, 0.05)
    assert (scores > t).sum() == 10
    assert (np.arange(1, 21.0) > ood.calibrate(np.arange(1, 21.0), 0.05)).sum() == 1
    with pytest.raises(ValueError, match="not finite"):
        ood.calibrate(np.array([1.0, np.nan]))


def test_an_unseen_class_is_flagged_and_held_out_tiles_of_seen_classes_are_not(tmp_path):
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 4, (3, 16))
    train_x, train_y = _clusters(rng, 200, centres)
    val_x, _ = _clusters(rng, 60, centres)
    test_x, _ = _clusters(rng, 100, centres)
    unseen, _ = _clusters(rng, 100, [rng.normal(0, 4, 16) + 8])
    stats = ood.fit([train_x], train_y, [val_x], 3)
    assert stats.num_fit == 600 and stats.num_calibration == 180
    _, held_out = stats.flags(test_x)
    _, new = stats.flags(unseen)
    assert held_out.mean() <= 0.10 and new.mean() >= 0.95, (held_out.mean(), new.mean())
    stats.save(str(tmp_path))
    back = ood.OODStats.load(str(tmp_path))
    np.testing.assert_array_equal(back.scores(unseen), stats.scores(unseen))
    assert back.threshold == stats.threshold
    assert ood.OODStats.load(str(tmp_path / "old_run")) is None


def test_bad_statistics_are_refused_with_the_file_named(tmp_path):
    (tmp_path / ood.OOD_FILE).write_bytes(b"not a npz")
    with pytest.raises(ValueError, match="ood.npz: unreadable"):
        ood.OODStats.load(str(tmp_path))
    with pytest.raises(ValueError, match="precision must be"):
        ood.OODTerm("features", "mean", np.zeros((2, 3)), np.eye(2))
    with pytest.raises(ValueError, match="at least 2"):
        ood.fit_gaussians(np.zeros((1, 3)), np.array([0]), 2)


def test_embedding_is_the_average_pooled_feature_map():
    maps = np.random.default_rng(2).normal(size=(2, 3, 3, 4))
    np.testing.assert_allclose(ood.embed(maps), maps.reshape(2, 9, 4).mean(1))


def test_terms_are_standardised_on_val_and_the_score_is_their_maximum(tmp_path):
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 4, (3, 6))
    a_fit, y = _clusters(rng, 200, centres)
    b_fit, _ = _clusters(rng, 200, 2 * centres[:, :4], spread=5.0)
    a_val, _ = _clusters(rng, 80, centres)
    b_val, _ = _clusters(rng, 80, 2 * centres[:, :4], spread=5.0)
    layers = (("normalize", "mean_sd"), ("features", "mean"))
    stats = ood.fit([a_fit, b_fit], y, [a_val, b_val], 3, layers)
    assert stats.layers == layers and stats.dim == 10
    # the reference, by hand: each term's val distances give its centre and scale
    ref = []
    for t, fit_x, val_x in zip(stats.terms, (a_fit, b_fit), (a_val, b_val)):
        means, precision = ood.fit_gaussians(fit_x, y, 3)
        d_val = ood.mahalanobis_min(val_x, means, precision)
        assert t.center == pytest.approx(d_val.mean()) and t.scale == pytest.approx(d_val.std())
        ref.append((means, precision, d_val.mean(), d_val.std()))
    query = np.concatenate([rng.normal(0, 6, (9, 6)), rng.normal(0, 9, (9, 4))], axis=1)
    want = np.max(
        [
            (ood.mahalanobis_min(q, m, p) - c) / s
            for q, (m, p, c, s) in zip((query[:, :6], query[:, 6:]), ref)
        ],
        axis=0,
    )
    np.testing.assert_allclose(stats.scores(query), want, rtol=1e-10)
    val_scores = stats.scores(np.concatenate([a_val, b_val], axis=1))
    assert (val_scores > stats.threshold).sum() == round(0.05 * len(val_scores))
    stats.save(str(tmp_path))
    back = ood.OODStats.load(str(tmp_path))
    assert back.layers == layers and back.threshold == stats.threshold
    np.testing.assert_array_equal(back.scores(query), stats.scores(query))
    with pytest.raises(ValueError, match=r"features must be \[N, 10\]"):
        stats.scores(query[:, :6])


def test_a_shift_seen_in_one_term_only_is_flagged():
    # term a (colour) is shifted for the new tiles, term b (the last map) is not: the maximum
    # of the standardised distances flags them; held-out tiles of the training classes are not.
    rng = np.random.default_rng(4)
    centres = rng.normal(0, 4, (3, 8))
    fit_a, y = _clusters(rng, 200, centres)
    fit_b, _ = _clusters(rng, 200, centres)
    val = [_clusters(rng, 60, centres)[0] for _ in range(2)]
    stats = ood.fit([fit_a, fit_b], y, val, 3, (("normalize", "mean_sd"), ("features", "mean")))
    held_out = np.concatenate([_clusters(rng, 100, centres)[0] for _ in range(2)], axis=1)
    shifted = np.concatenate(
        [_clusters(rng, 100, centres + 6)[0], _clusters(rng, 100, centres)[0]], axis=1
    )
    assert stats.flags(held_out)[1].mean() <= 0.1
    assert stats.flags(shifted)[1].mean() >= 0.95


def test_a_run_of_before_loads_its_single_pooled_term_said_once(tmp_path, caplog):
    rng = np.random.default_rng(5)
    x, y = _clusters(rng, 50, rng.normal(0, 3, (2, 4)))
    means, precision = ood.fit_gaussians(x, y, 2)
    meta = {"threshold": 7.5, "flag_fraction": 0.05, "num_fit": 100, "num_calibration": 40}
    with open(tmp_path / ood.OOD_FILE, "wb") as f:  # the file as runs wrote it before
        np.savez(f, means=means, precision=precision, meta=json.dumps(meta))
    caplog.set_level(logging.INFO, logger="kd_histo")
    old = ood.OODStats.load(str(tmp_path))
    again = ood.OODStats.load(str(tmp_path))
    assert caplog.text.count("pooled last feature map only") == 1
    assert "tools/refit_ood.py" in caplog.text
    assert old.layers == (("features", "mean"),) and again.threshold == 7.5
    q = rng.normal(0, 5, (6, 4))
    np.testing.assert_allclose(old.scores(q), ood.mahalanobis_min(q, means, precision))


def test_a_stain_normalised_run_without_the_scanned_colours_is_told_to_refit(tmp_path, caplog):
    rng = np.random.default_rng(6)
    centres = rng.normal(0, 3, (2, 4))
    x, y = _clusters(rng, 50, centres)
    v, _ = _clusters(rng, 20, centres)
    stats = ood.fit([x], y, [v], 2, (("features", "mean"),))
    stats.save(str(tmp_path))
    with np.load(tmp_path / ood.OOD_FILE) as z:  # the same statistics as format 2 wrote them
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta")))
    with open(tmp_path / ood.OOD_FILE, "wb") as f:
        np.savez(f, meta=json.dumps({**meta, "format": 2}), **arrays)
    caplog.set_level(logging.INFO, logger="kd_histo")
    assert ood.load_for(str(tmp_path), stain_normalised=False).threshold == stats.threshold
    assert "colours as scanned" not in caplog.text  # format 2 is current without a stain layer
    ood.load_for(str(tmp_path), stain_normalised=True)
    ood.load_for(str(tmp_path), stain_normalised=True)
    assert caplog.text.count("without the colours as scanned (format 2)") == 1
    assert f"refit_ood.py --model_dir={tmp_path}" in caplog.text
    stats.save(str(tmp_path))  # refitted: this kd_histo's format
    caplog.clear()
    ood.load_for(str(tmp_path / "."), stain_normalised=True)
    assert "colours as scanned" not in caplog.text
