"""The embedded synthetic data is deterministic and its classes are separated by fine detail."""

import numpy as np
import pytest

from kd_histo.data import synthetic


def test_deterministic_and_shapes():
    a, la, sa = synthetic.generate(3, 32, seed=5)
    b, lb, sb = synthetic.generate(3, 32, seed=5)
    c, _, _ = synthetic.generate(3, 32, seed=6)
    assert a.shape == (12, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert list(la) == list(lb) and sa == sb
    assert not np.array_equal(a, c)
    assert sorted(set(la.tolist())) == [0, 1, 2, 3]


def test_looks_like_he():
    imgs, _, _ = synthetic.generate(10, 64, seed=0)
    mean = imgs.reshape(-1, 3).mean(0)
    # H&E: green channel absorbs most (pink/purple), red and blue stay bright.
    assert mean[1] < mean[0] - 30 and mean[1] < mean[2] - 30


def test_fine_structure_is_lost_by_downsampling():
    """A high-pass energy feature separates classes at full resolution far better than at 8x."""
    imgs, labels, _ = synthetic.generate(20, 64, seed=1)
    g = imgs[..., 1].astype(np.float32)

    def highpass_energy(x):
        return np.abs(np.diff(x, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(x, axis=2)).mean(
            axis=(1, 2)
        )

    def fisher(feature):
        means = np.array([feature[labels == c].mean() for c in range(4)])
        within = np.mean([feature[labels == c].var() for c in range(4)])
        return means.var() / within

    lr = g.reshape(-1, 8, 8, 8, 8).mean(axis=(2, 4))  # 8x area downsampling
    assert fisher(highpass_energy(g)) > 3 * fisher(highpass_energy(lr))


def test_write_tile_folder(tmp_path):
    manifest = synthetic.write_tile_folder(str(tmp_path), 2, 16, seed=0, n_unlabeled=3)
    lines = open(manifest).read().strip().splitlines()
    assert lines[0] == "path,label,slide_id,patient_id"
    assert len(lines) == 1 + 4 * 2 + 3
    assert sum(1 for line in lines[1:] if line.split(",")[1] == "") == 3
    for line in lines[1:]:
        assert (tmp_path / line.split(",")[0]).is_file()


def test_bad_label():
    with pytest.raises(ValueError):
        synthetic.render_tile(np.random.default_rng(0), 9)
