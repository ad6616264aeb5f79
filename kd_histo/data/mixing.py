"""Mixing example streams: labeled + unlabeled at a ratio, class-balanced sampling, subsets.

All three are ``tf.data`` transformations, deterministic under a seed. Mixing and balancing
draw from *infinite* (repeated) streams, so the ratio holds at any point of an epoch; the
pipeline cuts the result into epochs and gives each epoch its own seed (a seed may be an int64
tensor), so a stream draws the same each time it is iterated. This module does not read shards
or augment.
"""

from __future__ import annotations

import tensorflow as tf


def mix(
    labeled: tf.data.Dataset, unlabeled: tf.data.Dataset, unlabeled_ratio: float, seed: int
) -> tf.data.Dataset:
    """Each element comes from ``unlabeled`` with probability ``unlabeled_ratio``.

    Args:
      labeled: repeated stream of labeled examples.
      unlabeled: repeated stream of unlabeled examples (label -1).
      unlabeled_ratio: in [0, 1].
      seed: draw seed (int or int64 tensor); the same draws on every iteration.

    Returns:
      The mixed stream.
    """
    if not 0.0 <= unlabeled_ratio <= 1.0:
        raise ValueError(f"unlabeled_ratio must be in [0, 1], got {unlabeled_ratio}")
    if unlabeled_ratio == 0.0:
        return labeled
    if unlabeled_ratio == 1.0:
        return unlabeled
    return tf.data.Dataset.sample_from_datasets(
        [labeled, unlabeled],
        weights=[1.0 - unlabeled_ratio, unlabeled_ratio],
        seed=seed,
        rerandomize_each_iteration=False,
    )


def class_balanced(
    examples: tf.data.Dataset, num_classes: int, seed: int, shuffle_buffer: int = 256
) -> tf.data.Dataset:
    """Equal-probability sampling of the classes 0..num_classes-1 (infinite stream).

    Each class gets its own filtered, repeated, shuffled stream, so ``examples`` is read once per
    class per pass: cache it first when decoding is costly. A class without examples would make
    ``sample_from_datasets`` wait forever, so callers check the counts first.
    """
    per_class = [
        examples.filter(lambda ex, c=c: tf.equal(ex["label"], c))
        .repeat()
        .shuffle(shuffle_buffer, seed=seed + 7919 * (c + 1), reshuffle_each_iteration=False)
        for c in range(num_classes)
    ]
    return tf.data.Dataset.sample_from_datasets(
        per_class,
        weights=[1.0 / num_classes] * num_classes,
        seed=seed,
        rerandomize_each_iteration=False,
    )


def example_key(ex: dict) -> tf.Tensor:
    """A string naming one tile: source, slide id and coordinates."""
    return tf.strings.join(
        [
            ex["source"],
            ex["slide_id"],
            tf.strings.as_string(ex["x"]),
            tf.strings.as_string(ex["y"]),
        ],
        separator="|",
    )


def subset(examples: tf.data.Dataset, fraction: float) -> tf.data.Dataset:
    """A deterministic subset of about ``fraction`` of the tiles, by a hash of each tile's key.

    Independent of order and of the seed; subsets are nested (the 25% subset lies inside the 50%
    one), which is what "extra unlabeled data at fraction f" experiments compare.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return examples
    buckets = 1 << 30
    limit = round(fraction * buckets)
    return examples.filter(
        lambda ex: tf.strings.to_hash_bucket_fast(example_key(ex), buckets) < limit
    )
