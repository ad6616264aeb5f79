"""Augmentation ops: eager == tf.data under a seed, NumPy references, the presets."""

import functools

import numpy as np
import pytest
import tensorflow as tf

from kd_histo.data import augment

from .data_helpers import eager_and_in_tfdata, random_tile

GRAY = np.array([0.2989, 0.5870, 0.1140], np.float32)  # tf.image.rgb_to_grayscale weights


def _np_adjust(x, b, c, s):
    """torchvision ColorJitter arithmetic (brightness, contrast, saturation; no hue)."""
    x = np.clip(x * b, 0, 1)
    m = (x @ GRAY).mean()
    x = np.clip(m + c * (x - m), 0, 1)
    g = (x @ GRAY)[..., None]
    return np.clip(g + s * (x - g), 0, 1)


def _symmetries(x):
    out = []
    for flipped in (x, x[:, ::-1]):
        out += [np.rot90(flipped, k, axes=(0, 1)) for k in range(4)]
    return out


OPS = {
    "flip_rot": augment.random_flip_rot,
    "color_jitter": augment.random_color_jitter,
    "randaugment": augment.random_augment,
    **{f"preset_{p}": functools.partial(augment.augment, preset=p) for p in augment.PRESETS},
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_same_eagerly_and_in_tfdata(name):
    tile = random_tile(16, seed=1)
    for seed in ([3, 9], [11, 0]):
        eager, graph = eager_and_in_tfdata(OPS[name], tile, seed)
        np.testing.assert_allclose(eager, graph, atol=1e-6, err_msg=f"{name} seed {seed}")
        assert eager.shape == tile.shape and eager.min() >= 0 and eager.max() <= 1


def test_adjust_color_matches_numpy_reference():
    tile = random_tile(12, seed=2)
    for b, c, s in [(1.3, 0.7, 1.4), (0.6, 1.5, 0.2), (1.0, 1.0, 1.0)]:
        got = augment.adjust_color(tile, b, c, s, 0.0).numpy()
        np.testing.assert_allclose(
            got, _np_adjust(tile, b, c, s), atol=2e-5, err_msg=f"{b} {c} {s}"
        )


def test_hue_shift_of_one_third_turn_rotates_primaries():
    red = np.zeros((2, 2, 3), np.float32)
    red[..., 0] = 1.0
    np.testing.assert_allclose(
        augment.adjust_color(red, 1.0, 1.0, 1.0, 1 / 3).numpy()[0, 0], [0, 1, 0], atol=1e-5
    )


def test_flip_rot_gives_all_eight_square_symmetries_and_nothing_else():
    tile = random_tile(6, seed=3)
    syms = _symmetries(tile)
    seen = set()
    for i in range(48):
        out = augment.random_flip_rot(tile, tf.constant([i, 5], tf.int64)).numpy()
        matches = [k for k, s in enumerate(syms) if np.array_equal(out, s)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(range(8))


def test_dihedral_matches_numpy_and_is_the_teacher_caches_one():
    from kd_histo.training import cache_store

    tile = random_tile(6, seed=4)
    syms = _symmetries(tile)  # index 4 * flipped + quarter turns, as ``dihedral`` numbers them
    for k in range(augment.NUM_DIHEDRAL):
        np.testing.assert_array_equal(augment.dihedral(tile, k).numpy(), syms[k], err_msg=f"k={k}")
    batch = np.stack([tile, tile[::-1], tile * 0.5])
    ks = [6, 1, 4]
    per = augment.dihedral_per_example(tf.constant(batch), tf.constant(ks)).numpy()
    for i, k in enumerate(ks):
        np.testing.assert_array_equal(per[i], _symmetries(batch[i])[k])
    assert cache_store.dihedral is augment.dihedral  # one definition of the group
    assert cache_store.dihedral_per_example is augment.dihedral_per_example


def test_color_jitter_factors_stay_in_range():
    # A flat grey tile: contrast and saturation do nothing, so out / in = the brightness factor.
    grey = np.full((4, 4, 3), 0.4, np.float32)
    ratios = [
        augment.random_color_jitter(
            grey, tf.constant([i, 0], tf.int64), 0.5, 0.0, 0.0, 0.0
        ).numpy()[0, 0, 0]
        / 0.4
        for i in range(40)
    ]
    assert 0.5 - 1e-5 <= min(ratios) < 0.7 and 1.3 < max(ratios) <= 1.5 + 1e-5


def test_seed_changes_result_and_none_is_identity():
    tile = random_tile(16, seed=4)
    a = augment.augment(tile, tf.constant([1, 1], tf.int64), "paper").numpy()
    b = augment.augment(tile, tf.constant([2, 1], tf.int64), "paper").numpy()
    assert np.abs(a - b).max() > 1e-3
    np.testing.assert_array_equal(
        augment.augment(tile, tf.constant([1, 1], tf.int64), "none").numpy(), tile
    )


def test_randaugment_uses_several_ops():
    tile = random_tile(8, seed=5)
    outs = {
        augment.random_augment(tile, tf.constant([i, 3], tf.int64), num_ops=1)
        .numpy()
        .round(4)
        .tobytes()
        for i in range(30)
    }
    assert len(outs) >= 6


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="choose one of"):
        augment.augment(random_tile(4), tf.constant([0, 0], tf.int64), "heavy")


def test_randaugment_ops_are_keras_cv_layers_and_match_numpy():
    import keras_cv

    x = random_tile(8, seed=2)
    assert isinstance(augment._kcv("Solarization"), keras_cv.layers.Solarization)
    np.testing.assert_allclose(
        augment.solarize(x, 0.5).numpy(), np.where(x < 0.75, x, 1 - x), atol=1e-5
    )
    lo, hi = x.min((0, 1)), x.max((0, 1))
    np.testing.assert_allclose(augment.autocontrast(x).numpy(), (x - lo) / (hi - lo), atol=1e-5)
    six_bits = (np.floor(x * 255).astype(np.uint8) >> 2 << 2) / 255.0
    np.testing.assert_allclose(augment.posterize(x, 0.5).numpy(), six_bits, atol=1e-6)
    np.testing.assert_allclose(
        augment.sharpness(x, 1.0).numpy(), x, atol=1e-6
    )  # enhance 1 = identity
    k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0
    smooth = np.stack(
        [
            [
                [(x[i - 1 : i + 2, j - 1 : j + 2, c] * k).sum() for c in range(3)]
                for j in range(1, 7)
            ]
            for i in range(1, 7)
        ]
    )
    want = np.clip(x[1:7, 1:7] + 1.5 * (x[1:7, 1:7] - smooth), 0, 1)  # enhance 2.5 sharpens
    got = augment.sharpness(x, 2.5).numpy()
    np.testing.assert_allclose(got[1:7, 1:7], want, atol=1e-5)
    np.testing.assert_allclose(got[0], x[0], atol=1e-6)  # borders keep the original


def test_keras_cv_equalization_is_not_pillows_so_it_is_left_out():
    """Why random_augment has no equalize: keras-cv 0.9's step uses the smallest non-empty bin."""
    import keras_cv
    from PIL import Image, ImageOps

    rgb = (random_tile(16, seed=4) * 0.5 * 255).astype(np.uint8)  # a low-contrast tile
    want = np.asarray(ImageOps.equalize(Image.fromarray(rgb)))
    layer = keras_cv.layers.Equalization(value_range=(0, 255))
    got = layer(tf.constant(rgb[None], tf.float32)).numpy()[0]
    assert np.abs(got - want).max() > 50  # not a rounding difference


def test_flips_hed_strong_is_flips_then_tellez_strong_hed_jitter_and_nothing_else():
    from kd_histo.data import stain

    tile = 0.1 + 0.4 * random_tile(16, seed=8)  # darker tones: few pixels clip at 1
    slopes = []
    for i in range(24):
        seed = tf.constant([i, 7], tf.int64)
        out = augment.augment(tile, seed, "flips+hed_strong").numpy()
        s_geo, _, s_hed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        flipped = augment.random_flip_rot(tile, s_geo)
        ref = stain.random_hed(flipped, s_hed, sigma=0.2, bias=0.05).numpy()
        np.testing.assert_allclose(out, ref, atol=1e-6)
        # Per stain, the HED concentrations are an affine map of the flipped tile's.
        h_in = stain.rgb_to_hed(flipped).numpy().reshape(-1, 3)
        h_out = stain.rgb_to_hed(tf.constant(out)).numpy().reshape(-1, 3)
        ok = np.all((out > 1e-3) & (out < 1 - 1e-3), axis=-1).reshape(-1)
        assert ok.sum() > 16
        slopes.append([np.polyfit(h_in[ok, c], h_out[ok, c], 1)[0] for c in range(3)])
    dev = np.abs(np.array(slopes) - 1.0)
    assert dev.max() <= 0.2 + 1e-3  # alpha in [0.8, 1.2]
    assert dev.max() > 0.1  # beyond paper+hed's [0.95, 1.05]


def test_lab_jitter_matches_numpy_reinhard_transfer_to_jittered_statistics():
    from .test_stain_norm import BETA, np_lab, np_od, np_rgb

    tile = 0.15 + 0.6 * random_tile(24, seed=3)
    tile[:4] = 1.0  # a strip of white background: left as it is
    x = tile.reshape(-1, 3).astype(np.float64)
    stained = np_od(tile).max(axis=1) >= BETA
    lab = np_lab(tile)
    mean, std = lab[stained].mean(0), lab[stained].std(0)
    moved = []
    for i in range(6):
        seed = tf.constant([i, 11], tf.int64)
        out = augment.random_lab_jitter(tile, seed, 1.0, 0.5).numpy().reshape(-1, 3)
        s_mean, s_std = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        z_mean = tf.random.stateless_normal([3], s_mean).numpy()
        z_std = tf.random.stateless_normal([3], s_std).numpy()
        ref = np_rgb((lab - mean) * np.exp(z_std * 0.5) + mean + z_mean * std)
        ref[~stained] = x[~stained]
        np.testing.assert_allclose(out, ref, atol=2e-4)
        np.testing.assert_array_equal(out[~stained], x[~stained].astype(np.float32))
        moved.append(np.abs(np_lab(out)[stained].mean(0) - mean) / std)
    assert np.max(moved) > 0.5  # the statistics really move, by the tile's own deviations


def test_flips_lab_is_flips_then_lab_jitter_and_nothing_else():
    tile = 0.15 + 0.6 * random_tile(16, seed=5)
    for i in range(4):
        seed = tf.constant([i, 3], tf.int64)
        out = augment.augment(tile, seed, "flips+lab").numpy()
        s_geo, s_col, _ = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        flipped = augment.random_flip_rot(tile, s_geo)
        ref = augment.random_lab_jitter(flipped, s_col, *augment.LAB_JITTER).numpy()
        np.testing.assert_allclose(out, ref, atol=1e-6)
        assert np.abs(out - flipped.numpy()).max() > 0.01


def test_flips_lab_hed_strong_is_flips_then_lab_then_hed_jitter():
    from kd_histo.data import stain

    tile = 0.15 + 0.6 * random_tile(16, seed=6)
    for i in range(4):
        seed = tf.constant([i, 5], tf.int64)
        out = augment.augment(tile, seed, "flips+lab+hed_strong").numpy()
        s_geo, s_col, s_hed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        flipped = augment.random_flip_rot(tile, s_geo)
        lab = augment.random_lab_jitter(flipped, s_col, *augment.LAB_JITTER)
        ref = stain.random_hed(lab, s_hed, *augment.HED_STRONG_JITTER).numpy()
        np.testing.assert_allclose(out, ref, atol=1e-6)
        # the same seed's single-jitter presets differ from it: both jitters are applied
        for one in ("flips+lab", "flips+hed_strong"):
            assert np.abs(out - augment.augment(tile, seed, one).numpy()).max() > 0.01


def test_lab_jitter_leaves_a_blank_tile_alone():
    blank = np.ones((16, 16, 3), np.float32)
    out = augment.random_lab_jitter(blank, tf.constant([1, 2], tf.int64))
    np.testing.assert_array_equal(np.asarray(out), blank)
