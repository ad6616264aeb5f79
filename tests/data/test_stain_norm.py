"""Stain normalisation ops against NumPy references written from the papers, on real H&E tiles.

The references below are independent of kd_histo/data/stain_norm.py: float64, Reinhard's
l-alpha-beta from the matrices printed in Reinhard et al. (2001), Macenko's stain vectors from an
SVD (not an eigendecomposition) of the optical densities and concentrations from
``np.linalg.lstsq``, percentiles from ``np.percentile``.
"""

import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from kd_histo.data import stain_norm as sn

BETA = 0.15


# ------------------------------------------------------------------------ NumPy references
def np_lab(rgb):
    lms = (
        rgb.reshape(-1, 3).astype(np.float64)
        @ np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]]).T
    )
    log_lms = np.log10(np.maximum(lms, 1 / 255))
    rot = np.diag([3**-0.5, 6**-0.5, 2**-0.5]) @ np.array([[1, 1, 1], [1, 1, -2], [1, -1, 0]])
    return log_lms @ rot.T


def np_rgb(lab):
    rot = np.array([[1, 1, 1], [1, 1, -1], [1, -2, 0]]) @ np.diag(
        [3**0.5 / 3, 6**0.5 / 6, 2**0.5 / 2]
    )
    lms = 10 ** (lab @ rot.T)
    to_rgb = np.linalg.inv(
        [[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]]
    )
    return np.clip(lms @ to_rgb.T, 0, 1)


def np_od(rgb):
    return -np.log(np.clip(rgb.reshape(-1, 3).astype(np.float64), 1 / 255, 1))


def np_reinhard(image, mean_ref, std_ref):
    od = np_od(image)
    stained = od.max(axis=1) >= BETA
    lab = np_lab(image)
    mean, std = lab[stained].mean(0), lab[stained].std(0)
    out = np_rgb((lab - mean) / std * np.asarray(std_ref) + np.asarray(mean_ref))
    out[~stained] = image.reshape(-1, 3)[~stained]
    return out.reshape(image.shape)


def np_macenko_fit(od):
    """Stain matrix (H, E rows) and 99th-percentile concentrations of stained OD rows."""
    _, _, vt = np.linalg.svd(od, full_matrices=False)
    plane = vt[:2].T
    plane = plane * np.where(plane.sum(0) < 0, -1, 1)
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [1, 99], method="lower")
    v1 = plane @ [np.cos(lo), np.sin(lo)]
    v2 = plane @ [np.cos(hi), np.sin(hi)]
    he = np.array([v1, v2] if v1[0] > v2[0] else [v2, v1])
    conc = np.linalg.lstsq(he.T, od.T, rcond=None)[0].T
    return he, np.percentile(conc, 99, axis=0, method="lower")


def np_macenko(image, he_ref, max_ref):
    od = np_od(image)
    stained = od.min(axis=1) >= BETA
    he, max_c = np_macenko_fit(od[stained])
    conc = np.linalg.lstsq(he.T, od.T, rcond=None)[0].T
    out = np.exp(-(conc * (np.asarray(max_ref) / max_c)) @ np.asarray(he_ref).reshape(2, 3))
    return np.clip(out, 0, 1).reshape(image.shape)


# ------------------------------------------------------------------------ real tiles
def _tile(path, px=96):
    return np.asarray(Image.open(path).convert("RGB").resize((px, px), Image.BOX), np.float32) / 255


@pytest.fixture(scope="module")
def tiles():
    # Not the function-scoped ``shared_data`` fixture: this one is module-scoped. Imported from
    # ``support`` (one module of that name), never from ``conftest`` (several, one per folder).
    from support import shared_data_or_skip

    root = shared_data_or_skip()
    lung = sorted((root / "lc25000_lung").glob("*/*.jpeg"))
    nct = sorted((root / "nct_crc_he_samples").glob("*.tif"))
    pick = [lung[0], lung[len(lung) // 2], lung[-1]]  # one tile of each of the three classes
    return [_tile(p) for p in pick], [_tile(p) for p in nct if "BACK" not in p.name]


def test_lab_round_trip_and_reference():
    rgb = np.random.default_rng(0).uniform(0.05, 1, (6, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(sn.rgb_to_lab(rgb).numpy().reshape(-1, 3), np_lab(rgb), atol=1e-5)
    np.testing.assert_allclose(sn.lab_to_rgb(sn.rgb_to_lab(rgb)).numpy(), rgb, atol=1e-4)


def test_reinhard_matches_the_numpy_reference_on_real_tiles(tiles):
    lung, nct = tiles
    ref = sn.fit_reference("reinhard", nct, source="nct")
    for tile in lung:
        ours = sn.reinhard(tile, ref).numpy()
        np.testing.assert_allclose(ours, np_reinhard(tile, ref.mean, ref.std), atol=2e-3)
        assert np.abs(ours - tile).mean() > 0.01  # the colours did move towards the reference


def test_reinhard_moves_the_stained_pixels_statistics_to_the_reference(tiles):
    lung, nct = tiles
    ref = sn.fit_reference("reinhard", nct[:1])
    out = sn.reinhard(lung[0], ref).numpy()
    lab = np_lab(out)[np_od(lung[0]).max(1) >= BETA]
    np.testing.assert_allclose(lab.mean(0), ref.mean, atol=0.02)  # clipping to [0, 1] only
    np.testing.assert_allclose(lab.std(0), ref.std, rtol=0.1, atol=0.005)


def test_macenko_matches_the_numpy_reference_on_real_tiles(tiles):
    lung, nct = tiles
    ref = sn.fit_reference("macenko", nct, source="nct")
    he, max_c = np_macenko_fit(np.concatenate([np_od(t)[np_od(t).min(1) >= BETA] for t in nct]))
    np.testing.assert_allclose(np.reshape(ref.stain_matrix, (2, 3)), he, atol=2e-3)
    np.testing.assert_allclose(ref.max_concentration, max_c, rtol=2e-3)
    for tile in lung:
        ours = sn.macenko(tile, ref).numpy()
        np.testing.assert_allclose(ours, np_macenko(tile, he, max_c), atol=5e-3)
        assert np.abs(ours - tile).mean() > 0.01


def test_stain_vectors_of_real_he_are_haematoxylin_then_eosin(tiles):
    _, nct = tiles
    ref = sn.fit_reference("macenko", nct)
    h, e = np.reshape(ref.stain_matrix, (2, 3))
    np.testing.assert_allclose([np.linalg.norm(h), np.linalg.norm(e)], 1, atol=1e-5)
    assert (h > 0).all() and (e > -0.05).all()
    assert h[0] > e[0] and e[1] > h[1]  # H absorbs red more, E absorbs green more


def test_a_tile_normalised_to_its_own_reference_barely_changes(tiles):
    lung, _ = tiles
    tile = lung[0]
    for method, tol in (("reinhard", 0.01), ("macenko", 0.03)):
        ref = sn.fit_reference(method, [tile])
        assert np.abs(sn.normalise(tile, ref).numpy() - tile).mean() < tol, method


def test_white_background_does_not_disturb_the_fit_nor_the_tissue(tiles):
    lung, nct = tiles
    tile = lung[1]
    padded = np.ones((tile.shape[0], tile.shape[1] * 3, 3), np.float32) * 0.97
    padded[:, : tile.shape[1]] = tile
    for method in ("reinhard", "macenko"):
        ref_a = sn.fit_reference(method, [tile])
        ref_b = sn.fit_reference(method, [padded])
        a = np.array(ref_a.mean + ref_a.std + ref_a.stain_matrix + ref_a.max_concentration)
        b = np.array(ref_b.mean + ref_b.std + ref_b.stain_matrix + ref_b.max_concentration)
        np.testing.assert_allclose(a, b, atol=1e-5)
        ref = sn.fit_reference(method, nct)
        alone = sn.normalise(tile, ref).numpy()
        inside = sn.normalise(padded, ref).numpy()[:, : tile.shape[1]]
        np.testing.assert_allclose(inside, alone, atol=1e-4)


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_ops_run_the_same_inside_tf_data_and_leave_blank_tiles_alone(method):
    rng = np.random.default_rng(1)
    tile = np.clip(np.array([0.7, 0.35, 0.6]) + rng.normal(0, 0.08, (32, 32, 3)), 0, 1)
    tile = tile.astype(np.float32)
    ref = sn.fit_reference(method, [tile])
    eager = sn.normalise(tile, ref).numpy()
    ds = tf.data.Dataset.from_tensors(tile).map(lambda x: sn.normalise(x, ref))
    np.testing.assert_allclose(next(iter(ds)).numpy(), eager, atol=1e-5)
    blank = np.full((32, 32, 3), 0.95, np.float32)
    np.testing.assert_array_equal(sn.normalise(blank, ref).numpy(), blank)


def test_reference_record_round_trips_and_rejects_bad_values():
    ref = sn.StainReference(
        "macenko",
        stain_matrix=(0.6, 0.7, 0.3, 0.1, 0.9, 0.2),
        max_concentration=(1.5, 1.0),
        source="x",
        num_tiles=3,
    )
    assert sn.StainReference.from_json(json.loads(json.dumps(ref.to_json()))) == ref
    with pytest.raises(ValueError, match="max_concentration 2, got 6 and 1"):
        sn.StainReference("macenko", stain_matrix=(1,) * 6, max_concentration=(1.0,))
    with pytest.raises(ValueError, match="unknown method"):
        sn.StainReference("vahadane")
    with pytest.raises(ValueError, match="not finite"):
        sn.StainReference("reinhard", mean=(0, 0, float("nan")), std=(1, 1, 1))
    with pytest.raises(ValueError, match="stained pixels"):
        sn.fit_reference("reinhard", [np.full((8, 8, 3), 250, np.uint8)], source="white.png")
    with pytest.raises(ValueError, match="no images"):
        sn.fit_reference("macenko", [])
