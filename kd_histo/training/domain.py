"""What a run measures of its own domain: the stain reference it normalises to (at its start) and
the out-of-domain statistics of its embedding (at its end).

- :func:`stain_reference`: a teacher or baseline fits its reference on ``--stain_reference`` or on
  an even spread of its training tiles (the HR view, before any augmentation); a distilled
  student takes its teacher's, so teacher and student see the same colours.
- :func:`fit_ood`: class-conditional Gaussians of the finished net's feature statistics at
  several depths on the labeled training tiles, the threshold calibrated on the val tiles
  (:mod:`kd_histo.models.ood`), each tile read as the net reads it (its own view, no
  augmentation); :func:`refit_ood` measures them again for a trained run (no training).

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
from kd_histo.models import ood, ood_features
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


def _ood_features(stream, view: str, features_of, limit: int):
    """(features [N, D], labels [N]) of up to ``limit`` tiles of a stream of batches, read as the
    net reads them (``batch[view]``); ``features_of``: :func:`ood_features.feature_function`."""
    feats, labels, n = [], [], 0
    for batch in stream:
        _, f = features_of(batch[view])
        feats.append(np.asarray(f, np.float64))
        labels.append(np.asarray(batch["label"]))
        n += len(labels[-1])
        if n >= limit:
            break
    if not feats:
        return np.zeros((0, 0)), np.zeros((0,), np.int64)
    return np.concatenate(feats)[:limit], np.concatenate(labels)[:limit]


def fit_ood_on(
    stream, view: str, net: keras.Model, num_classes: int, has_val: bool, log=print
) -> ood.OODStats | None:
    """The net's out-of-domain statistics (:func:`ood_features.default_layers`), from
    ``stream(split)`` (batches in file order, no augmentation), or None (said once) when the
    data cannot give them: no val split, or fewer than two labeled training tiles."""
    if not has_val:
        log("no out-of-domain statistics: no val split to calibrate the threshold on")
        return None
    layers = ood_features.default_layers(net)
    features_of = ood_features.feature_function(net, layers)
    x, y = _ood_features(stream("train"), view, features_of, OOD_FIT_TILES)
    labeled = int((y >= 0).sum())
    if labeled < 2:
        log(f"no out-of-domain statistics: {labeled} labeled training tiles (need 2 or more)")
        return None
    v, _ = _ood_features(stream("val"), view, features_of, OOD_CALIBRATION_TILES)
    if len(v) == 0:
        log("no out-of-domain statistics: no val tiles to calibrate the threshold on")
        return None
    cuts = np.cumsum(ood_features.dims(net, layers))[:-1]
    return ood.fit(np.split(x, cuts, 1), y, np.split(v, cuts, 1), num_classes, layers)


def fit_ood(
    cfg: RunConfig, net: keras.Model, num_classes: int, has_val: bool, log=print
) -> ood.OODStats | None:
    """:func:`fit_ood_on` the run's own tiles at the end of training."""
    return fit_ood_on(
        lambda split: _plain_stream(cfg, split), cfg.view, net, num_classes, has_val, log
    )


def refit_ood(model_dir: str, data_dir: str = "", log=print) -> ood.OODStats | None:
    """Measures a trained run's out-of-domain statistics again, without training: the current
    score's terms on its training tiles (``data_dir``, default the run's own), threshold on its val
    tiles; writes ``ood.npz`` and run.json's ``ood_threshold``. Returns the statistics (None, said
    once, when the data has no val split or labels).

    Raises:
      FileNotFoundError, ValueError: no such run, or data it cannot read (the file named).
    """
    from kd_histo.models import load_model
    from kd_histo.schema import DatasetInfo
    from kd_histo.training.run_record import read_run_record, write_run_record

    run = read_run_record(model_dir)
    net = load_model(run.model_path(model_dir), run.num_classes)
    data_dir = data_dir or run.data_dir
    info = DatasetInfo.read(data_dir)
    pipe = dataclasses.replace(run.pipeline_config(data_dir, _BATCH), labeled=True, cache=False)

    def stream(split):
        return make_dataset(pipe, split, training=False)

    has_val = info.num_examples("val") > 0
    stats = fit_ood_on(stream, run.view, net, run.num_classes, has_val, log)
    if stats is not None:
        stats.save(model_dir)
        write_run_record(model_dir, dataclasses.replace(run, ood_threshold=stats.threshold))
    return stats
