"""What a run measures of its own domain: the stain reference it normalises to (at its start) and
the out-of-domain statistics of its embedding (at its end).

- :func:`stain_reference`: a teacher or baseline fits its reference on ``--stain_reference`` or on
  an even spread of its training tiles (the HR view, before any augmentation); a distilled
  student takes its teacher's, so teacher and student see the same colours.
- :func:`fit_ood`: class-conditional Gaussians of the finished net's pooled features on the
  labeled training tiles, the threshold calibrated on the val tiles
  (:mod:`kd_histo.models.ood`), each tile read as the net reads it (its own view, no
  augmentation).

Not here: the ops (``kd_histo.data.stain_norm``), the layer that carries the reference in the
net (``kd_histo.models.stain``), the scores' statistics (``kd_histo.models.ood``).
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from kd_histo.data import stain_norm
from kd_histo.data.pipeline import make_dataset
from kd_histo.models import ood
from kd_histo.models.stain import stain_reference_of
from kd_histo.training.config import RunConfig
from kd_histo.training.ensemble import members_of
from kd_histo.training.preflight import PreflightError

OOD_FIT_TILES = 4096  # training tiles the Gaussians are measured on, at most
OOD_CALIBRATION_TILES = 4096  # val tiles the threshold is calibrated on, at most
_BATCH = 64


def stain_reference(
    cfg: RunConfig, info, teacher: keras.Model | None
) -> stain_norm.StainReference | None:
    """The reference the run's net normalises its inputs to, or None (``--stain_norm=none``).

    Raises:
      PreflightError: a student asked for another normalisation than its teacher's.
    """
    if cfg.mode == "distill":
        # an ensemble's members share one normalisation (kd_histo.training.ensemble checks)
        ref = stain_reference_of(members_of(teacher)[0]) if teacher is not None else None
        have = ref.method if ref else "none"
        if cfg.stain.method != "none" and cfg.stain.method != have:
            raise PreflightError(
                f"--stain_norm={cfg.stain.method}: a student takes its teacher's stain "
                f"normalisation and {cfg.distill.teacher} was trained with {have}; drop "
                "--stain_norm (or retrain the teacher with it)"
            )
        return ref
    if cfg.stain.method == "none":
        return None
    if cfg.stain.reference:
        return stain_norm.fit_reference_on_files(
            cfg.stain.method, cfg.stain.reference, cfg.stain.reference_tiles
        )
    total = sum(info.counts.get("train", {}).values())
    stride = max(1, math.ceil(total / cfg.stain.reference_tiles))
    images = (
        _plain_stream(cfg, "train")
        .unbatch()
        .map(lambda ex: ex["hr"])
        .shard(stride, 0)
        .take(cfg.stain.reference_tiles)
    )
    return stain_norm.fit_reference(
        cfg.stain.method,
        images.as_numpy_iterator(),
        source=f"{cfg.data.data_dir} training tiles",
    )


def _plain_stream(cfg: RunConfig, split: str):
    """The split in file order, centre crops, no augmentation, pixels in [0, 1]."""
    plain = dataclasses.replace(
        cfg.data, batch_size=_BATCH, normalize=False, cache=False, labeled=True
    )
    return make_dataset(plain, split, training=False)


def _embeddings(cfg: RunConfig, net: keras.Model, split: str, limit: int):
    """(embeddings [N, D], labels [N]) of up to ``limit`` tiles of ``split``, read as the net reads
    them (its view)."""
    feats, labels, n = [], [], 0
    for batch in _plain_stream(cfg, split):
        out = net(batch[cfg.view], training=False)
        feats.append(ood.embed(keras.ops.convert_to_numpy(out["features"])))
        labels.append(np.asarray(batch["label"]))
        n += len(labels[-1])
        if n >= limit:
            break
    if not feats:
        return np.zeros((0, 0)), np.zeros((0,), np.int64)
    return np.concatenate(feats)[:limit], np.concatenate(labels)[:limit]


def fit_ood(
    cfg: RunConfig, net: keras.Model, num_classes: int, has_val: bool, log=print
) -> ood.OODStats | None:
    """The finished net's out-of-domain statistics, or None (said once) when the data cannot
    give them: no val split, or fewer than two labeled training tiles."""
    if not has_val:
        log("no out-of-domain statistics: no val split to calibrate the threshold on")
        return None
    x, y = _embeddings(cfg, net, "train", OOD_FIT_TILES)
    labeled = int((y >= 0).sum())
    if labeled < 2:
        log(f"no out-of-domain statistics: {labeled} labeled training tiles (need 2 or more)")
        return None
    v, _ = _embeddings(cfg, net, "val", OOD_CALIBRATION_TILES)
    if len(v) == 0:
        log("no out-of-domain statistics: no val tiles to calibrate the threshold on")
        return None
    return ood.fit(x, y, v, num_classes)
