"""Ensemble teachers: several frozen nets distilled as one (``--teacher=RUN_A,RUN_B,RUN_C``).

The target distribution of KD at temperature T is the mean of the members' softened
probabilities, ``p = mean_i softmax(z_i / T)``. The ensemble hands it to the unchanged KD loss
(:func:`kd_histo.training.losses.kd_kl`, which reads logits) as **logits at T**:
``z = T * log(p)`` (:func:`ensemble_logits`, computed in log space), whose ``softmax(z / T)`` is
``p / sum(p) = p`` exactly. So the loss, the teacher cache (which stores the teacher's "logits")
and the train step stay as they are; only the ensemble's logits depend on T, so an ensemble is
built for one temperature (and a cache of its outputs is keyed by it). At T = 1 the same logits
score tiles: ``softmax(z)`` is the members' mean probability (evaluation and the cascade).

The ensemble's ``features`` are its members' maps concatenated along channels (their widths are
``feature_splits``); the feature loss then projects the student's map once per member
(:class:`kd_histo.training.losses.FeatureMapKD` with ``splits``) and averages the distances.
With ``features=False`` (``--ensemble_features=off``) the feature loss is off and ``features``
is the first member's map (the net contract wants one).

Not here: which files form an ensemble and the checks they pass (``kd_histo.training.preflight``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import tensorflow as tf

from kd_histo.models.stain import stain_reference_of
from kd_histo.training.losses import check_temperature

ENSEMBLE_FEATURES = ("projected", "off")


def ensemble_logits(member_logits: Sequence, temperature: float = 1.0) -> tf.Tensor:
    """Logits at ``temperature`` T of the mean of the members' softened probabilities.

    ``T * (logsumexp_i log_softmax(z_i / T) - log M)``, so that
    ``softmax(result / T) == mean_i softmax(z_i / T)``.

    Args:
      member_logits: M tensors [B, C] (M >= 1).
      temperature: T > 0, the KD temperature (1 for scoring).

    Returns:
      [B, C] float32 logits.
    """
    check_temperature("temperature", temperature)
    if not member_logits:
        raise ValueError("an ensemble needs at least one member")
    logs = [tf.nn.log_softmax(tf.cast(z, tf.float32) / temperature, axis=-1) for z in member_logits]
    stacked = tf.stack(logs, axis=0)  # [M, B, C]
    log_mean = tf.reduce_logsumexp(stacked, axis=0) - math.log(len(member_logits))
    return temperature * log_mean


@keras.saving.register_keras_serializable(package="kd_histo")
class EnsembleLogits(keras.layers.Layer):
    """:func:`ensemble_logits` of a list of members' logits, as a float32 layer."""

    def __init__(self, temperature: float = 1.0, **kwargs):
        super().__init__(dtype="float32", **{k: v for k, v in kwargs.items() if k != "dtype"})
        check_temperature("temperature", temperature)
        self.temperature = float(temperature)

    def call(self, member_logits):
        return ensemble_logits(list(member_logits), self.temperature)

    def compute_output_spec(self, member_logits):
        return keras.KerasTensor(member_logits[0].shape, dtype="float32")

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


def _map_sizes(members: Sequence[keras.Model], probe_px: int = 64) -> list[tuple[int, int]]:
    specs = [m.compute_output_spec(keras.KerasTensor((1, probe_px, probe_px, 3))) for m in members]
    return [tuple(int(v) for v in s["features"].shape[1:3]) for s in specs]


def build_ensemble(
    members: Sequence[keras.Model],
    names: Sequence[str],
    temperature: float = 1.0,
    features: bool = True,
) -> keras.Model:
    """One frozen net (``{"logits", "features"}``, the net contract) of several members.

    Args:
      members: the loaded member nets (kd_histo nets of one class list).
      names: what to call each member in errors (its run folder).
      temperature: the KD temperature the logits are for (see the module doc); 1 for scoring.
      features: concatenate the members' maps (they must have one size at one input size);
        False: the first member's map.

    Returns:
      A functional ``keras.Model`` with attributes ``members`` and ``feature_splits`` (the
      members' map widths when ``features``, else empty).

    Raises:
      ValueError: one line naming the member that does not fit the first.
    """
    if len(members) != len(names) or not members:
        raise ValueError("an ensemble needs at least one member, and one name per member")
    refs = [stain_reference_of(m) for m in members]
    methods = [r.method if r is not None else "none" for r in refs]
    for name, method in zip(names, methods):
        if method != methods[0]:
            raise ValueError(
                f"ensemble member {name} normalises stain with {method} but {names[0]} with "
                f"{methods[0]}; ensemble members must see the same colours"
            )
    if features:
        sizes = _map_sizes(members)
        for name, size in zip(names, sizes):
            if size != sizes[0]:
                raise ValueError(
                    f"ensemble member {name} has a {size[0]}x{size[1]} feature map where "
                    f"{names[0]} has {sizes[0][0]}x{sizes[0][1]} (another stride); use members "
                    "of one architecture, or --ensemble_features=off"
                )
    for i, m in enumerate(members):
        m.trainable = False
        m.name = f"member_{i}"  # a functional model needs its layers' names unique
    image = keras.Input((None, None, 3), name="image")
    outs = [m(image, training=False) for m in members]
    logits = EnsembleLogits(temperature, name="ensemble_logits")([o["logits"] for o in outs])
    maps = [o["features"] for o in outs]
    if features and len(maps) > 1:
        feats = keras.layers.Concatenate(axis=-1, name="member_features")(maps)
    else:
        feats = maps[0]
    model = keras.Model(image, {"logits": logits, "features": feats}, name="ensemble")
    model.trainable = False
    model.members = list(members)
    model.feature_splits = tuple(int(o.shape[-1]) for o in maps) if features else ()
    return model


def members_of(model: keras.Model) -> list[keras.Model]:
    """An ensemble's members; a single net is its own only member."""
    return list(getattr(model, "members", None) or [model])


def feature_splits(model: keras.Model | None) -> tuple[int, ...]:
    """The channel widths of an ensemble's concatenated member maps; () for a single net."""
    return tuple(getattr(model, "feature_splits", ()) or ())
