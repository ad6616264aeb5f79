"""Mixing labeled/unlabeled at a ratio, class balance, nested subsets (tf.data level)."""

import numpy as np
import pytest
import tensorflow as tf

from kd_histo.data import mixing


def _const(label, n=None):
    ds = tf.data.Dataset.from_tensors({"label": tf.constant(label, tf.int32)})
    return ds.repeat(n)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.8])
def test_mix_ratio_holds_over_hundreds_of_samples(ratio):
    labels = np.array(
        [
            e["label"]
            for e in mixing.mix(_const(1), _const(-1), ratio, seed=3).take(500).as_numpy_iterator()
        ]
    )
    # Binomial sd at n=500 is <= 0.023; 0.07 is three of them.
    assert abs((labels == -1).mean() - ratio) < 0.07


def test_mix_edge_ratios_and_bad_ratio():
    assert {
        int(e["label"])
        for e in mixing.mix(_const(1), _const(-1), 0.0, 0).take(20).as_numpy_iterator()
    } == {1}
    assert {
        int(e["label"])
        for e in mixing.mix(_const(1), _const(-1), 1.0, 0).take(20).as_numpy_iterator()
    } == {-1}
    with pytest.raises(ValueError, match="unlabeled_ratio"):
        mixing.mix(_const(1), _const(-1), 1.5, 0)


def test_class_balanced_evens_out_a_skewed_stream():
    skewed = tf.data.Dataset.from_tensor_slices(
        {"label": tf.constant([0] * 18 + [1] * 2 + [2] * 4, tf.int32)}
    )
    labels = np.array(
        [e["label"] for e in mixing.class_balanced(skewed, 3, seed=1).take(600).as_numpy_iterator()]
    )
    freq = np.bincount(labels, minlength=3) / len(labels)
    np.testing.assert_allclose(freq, [1 / 3] * 3, atol=0.07)


def _keyed(n):
    return tf.data.Dataset.from_tensor_slices(
        {
            "source": tf.constant([f"tile{i}.png" for i in range(n)]),
            "slide_id": tf.constant(["s"] * n),
            "x": tf.range(n, dtype=tf.int64),
            "y": tf.zeros(n, tf.int64),
        }
    )


def test_subset_is_deterministic_nested_and_about_the_fraction():
    def keys(f):
        return {e["source"] for e in mixing.subset(_keyed(1000), f).as_numpy_iterator()}

    quarter, half = keys(0.25), keys(0.5)
    assert quarter == keys(0.25)
    assert quarter <= half
    assert abs(len(quarter) / 1000 - 0.25) < 0.05 and abs(len(half) / 1000 - 0.5) < 0.05
    assert len(keys(1.0)) == 1000
