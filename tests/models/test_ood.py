"""Out-of-domain score: NumPy references (explicit loops), calibration, a shifted class flagged."""

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
    stats = ood.fit(train_x, train_y, val_x, 3)
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
        ood.OODStats(np.zeros((2, 3)), np.eye(2), 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        ood.fit_gaussians(np.zeros((1, 3)), np.array([0]), 2)


def test_embedding_is_the_average_pooled_feature_map():
    maps = np.random.default_rng(2).normal(size=(2, 3, 3, 4))
    np.testing.assert_allclose(ood.embed(maps), maps.reshape(2, 9, 4).mean(1))
