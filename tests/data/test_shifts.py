"""The test-set colour shifts of issue 30 against NumPy references written from the papers."""

import glob
import math

import numpy as np
import pytest
from PIL import Image

from kd_histo.data import shifts
from kd_histo.data.stain_norm import StainReference


def _tile(shared_data, pattern="lc25000_lung/lung_aca/*"):
    path = sorted(glob.glob(str(shared_data / pattern)))[0]
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((64, 64)))


def np_reinhard(rgb_u8, mean, std):
    """Reinhard et al. 2001 in NumPy: l-alpha-beta statistics of the stained pixels moved."""
    rgb = rgb_u8.reshape(-1, 3) / 255.0
    to_lms = np.array(
        [[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]]
    )
    rot = np.diag([1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)]) @ np.array(
        [[1, 1, 1], [1, 1, -2], [1, -1, 0]], float
    )
    lab = np.log10(np.maximum(rgb @ to_lms.T, 1 / 255)) @ rot.T
    stained = (-np.log(np.clip(rgb, 1 / 255, 1))).max(axis=1) >= 0.15
    m, s = lab[stained].mean(0), lab[stained].std(0)
    new = (lab - m) * (np.array(std) / np.maximum(s, 1e-3)) + np.array(mean)
    back = np.clip((10 ** (new @ np.linalg.inv(rot).T)) @ np.linalg.inv(to_lms).T, 0, 1)
    out = np.where(stained[:, None], back, rgb)
    return np.round(out * 255).reshape(rgb_u8.shape)


def np_hed(rgb_u8, alpha, beta):
    """Ruifrok & Johnston colour deconvolution (skimage's rgb2hed conventions), scaled, mixed."""
    m = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    log_adjust = np.log(1e-6)
    od = np.log(np.maximum(rgb_u8 / 255.0, 1e-6)) / log_adjust
    hed = od @ np.linalg.inv(m) * np.array(alpha) + np.array(beta)
    return np.round(np.clip(np.exp(hed * log_adjust @ m), 0, 1) * 255)


def test_reinhard_transfer_matches_numpy(shared_data):
    rgb = _tile(shared_data)
    ref = StainReference("reinhard", mean=(-0.7, -0.08, 0.03), std=(0.45, 0.08, 0.02))
    got = shifts.reinhard_transfer(rgb, ref).astype(int)
    want = np_reinhard(rgb, ref.mean, ref.std)
    assert got.dtype == int and got.shape == rgb.shape
    assert np.abs(got - want).max() <= 2
    assert np.abs(got - rgb.astype(int)).mean() > 5  # it does shift the colours


def test_hed_shift_matches_numpy(shared_data):
    rgb = _tile(shared_data, "lc25000_lung/lung_scc/*")
    got = shifts.hed_shift(rgb, shifts.HED_STRONG_ALPHA, shifts.HED_STRONG_BETA).astype(int)
    want = np_hed(rgb, shifts.HED_STRONG_ALPHA, shifts.HED_STRONG_BETA)
    assert np.abs(got - want).max() <= 2
    assert np.abs(got - rgb.astype(int)).mean() > 5


def test_hed_strong_is_beyond_the_training_jitter():
    # paper+hed draws alpha in [0.95, 1.05] and beta in [-0.05, 0.05] (kd_histo.data.stain).
    spec = shifts.hed_strong()
    assert max(abs(a - 1) for a in spec.alpha) > 0.05
    assert max(abs(b) for b in spec.beta) > 0.05


def test_nct_like_fits_the_folder_and_apply_is_deterministic(shared_data):
    spec = shifts.nct_like(str(shared_data / "nct_crc_he_samples"))
    assert spec.name == "nct" and spec.reference.num_tiles == 9
    rgb = _tile(shared_data)
    a, b = shifts.apply(spec, rgb), shifts.apply(spec, rgb)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, shifts.reinhard_transfer(rgb, spec.reference))


def test_shift_spec_refuses_a_reinhard_shift_without_reference():
    with pytest.raises(ValueError, match="needs a reinhard reference"):
        shifts.ShiftSpec("x", "reinhard")
    with pytest.raises(ValueError, match="kind"):
        shifts.ShiftSpec("x", "vahadane")
