"""Small helpers shared by the data-pipeline tests (not fixtures: plain functions)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def eager_and_in_tfdata(fn, image, seed):
    """Runs ``fn(image, seed)`` eagerly and inside ``Dataset.map``; returns both as NumPy."""
    image = tf.constant(image, tf.float32)
    seed = tf.constant(seed, tf.int64)
    eager = fn(image, seed).numpy()
    graph = next(iter(tf.data.Dataset.from_tensors((image, seed)).map(fn))).numpy()
    return eager, graph


def random_tile(px=16, seed=0):
    """A float32 RGB tile in [0, 1] with H&E-like colours (not flat, so colour ops change it)."""
    rng = np.random.default_rng(seed)
    base = np.array([0.85, 0.55, 0.75], np.float32)
    return np.clip(base + rng.normal(0, 0.15, (px, px, 3)), 0, 1).astype(np.float32)


def block_mean(images, f):
    """Area downsampling by an integer factor: mean over f x f blocks ([..., H, W, C])."""
    *lead, h, w, c = images.shape
    return images.reshape(*lead, h // f, f, w // f, f, c).mean(axis=(-4, -2))
