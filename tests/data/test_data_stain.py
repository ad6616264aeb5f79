"""HED stain jitter: NumPy references of the Ruifrok-Johnston deconvolution, invariants, seeds."""

import numpy as np
import pytest

from kd_histo.data import stain

from .data_helpers import eager_and_in_tfdata, random_tile


def _np_rgb_to_hed(rgb):
    od = np.log(np.maximum(rgb, 1e-6)) / np.log(1e-6)
    return od @ np.linalg.inv(stain.RGB_FROM_HED)


def _np_hed_to_rgb(hed):
    return np.clip(np.exp((hed * np.log(1e-6)) @ stain.RGB_FROM_HED), 0, 1)


def test_rgb_to_hed_matches_numpy_reference():
    tile = random_tile(8)
    np.testing.assert_allclose(
        stain.rgb_to_hed(tile).numpy(), _np_rgb_to_hed(tile), rtol=1e-4, atol=1e-5
    )


def test_hed_round_trip_is_identity():
    tile = random_tile(8, seed=1)
    back = stain.hed_to_rgb(stain.rgb_to_hed(tile)).numpy()
    np.testing.assert_allclose(back, tile, atol=1e-4)


def test_pure_haematoxylin_pixel_has_only_h_concentration():
    # A pixel coloured only by haematoxylin at concentration 0.3 unmixes to (0.3, 0, 0).
    pixel = _np_hed_to_rgb(np.array([[0.3, 0.0, 0.0]]))
    np.testing.assert_allclose(
        stain.rgb_to_hed(pixel.astype(np.float32)).numpy(), [[0.3, 0, 0]], atol=1e-4
    )


def test_hed_transform_matches_numpy_reference():
    tile = random_tile(8, seed=2)
    alpha, beta = np.array([1.05, 0.95, 1.0]), np.array([0.02, -0.03, 0.0])
    expected = _np_hed_to_rgb(_np_rgb_to_hed(tile) * alpha + beta)
    np.testing.assert_allclose(stain.hed_transform(tile, alpha, beta).numpy(), expected, atol=1e-4)


def test_random_hed_same_eagerly_and_in_tfdata_and_seed_dependent():
    tile = random_tile(16, seed=3)
    eager, graph = eager_and_in_tfdata(stain.random_hed, tile, [4, 2])
    np.testing.assert_allclose(eager, graph, atol=1e-6)
    other, _ = eager_and_in_tfdata(stain.random_hed, tile, [5, 2])
    assert np.abs(eager - other).max() > 1e-3
    assert np.abs(eager - tile).max() > 1e-3
    assert eager.min() >= 0 and eager.max() <= 1


@pytest.mark.parametrize("sigma", [0.0])
def test_zero_jitter_is_identity(sigma):
    tile = random_tile(8, seed=4)
    out = stain.random_hed(tile, np.array([1, 1]), sigma=sigma, bias=0.0).numpy()
    np.testing.assert_allclose(out, tile, atol=1e-4)
