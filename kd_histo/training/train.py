"""The one training loop of kd_histo: teacher, baseline and distilled student runs.

``train(cfg)`` runs, in order: preflight checks (nothing is written when they fail), the precision
policy (restored afterwards), the distribution strategy, data (``make_dataset``), the network
(``build_model``) wrapped in a ``ResolutionDistiller`` (teacher: supervised on "hr"; baseline:
supervised on "lr"; distill: frozen teacher on "hr", student on "lr", KD + feature loss), the
optimizer and schedule, callbacks (an atomic backup first, best-network checkpoint, TensorBoard
with per-loss scalars, HR/LR grids and an early profile window, CSV log, TerminateOnNaN, progress
bar) and ``fit``. The run folder receives config.json at the start and run.json, model.keras (the
best network alone) and savedmodel/ at the end.

Not here: flags (``kd_histo.cli.train``), the losses and train step
(``kd_histo.training.distiller``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from collections.abc import Sequence

import keras
import tensorflow as tf

from kd_histo import schema
from kd_histo.atomic import write_json
from kd_histo.convert.writer import DirLock
from kd_histo.data.pipeline import make_dataset, steps_per_epoch, training_stream
from kd_histo.models import build_model, input_normalisation
from kd_histo.models.keras_cv_backbone import is_keras_cv
from kd_histo.models.stain import stain_reference_of
from kd_histo.training import backup, divergence, domain, embedding_run, ensemble, preflight
from kd_histo.training import callbacks as cbs
from kd_histo.training import losses as L
from kd_histo.training.config import RunConfig
from kd_histo.training.distiller import ResolutionDistiller, losses_for
from kd_histo.training.divergence import TrainingError  # noqa: F401 - part of this module's API
from kd_histo.training.embedding import is_embedding_net
from kd_histo.training.optimizers import FusedAdam
from kd_histo.training.run_record import (
    CONFIG_JSON,
    MODEL_FILE,
    RunRecord,
    model_file,  # noqa: F401 - part of this module's API (tests read a teacher's file through it)
    write_run_record,
)

_LOG = logging.getLogger(__name__)
LOCK_FILE = ".lock-train"  # what DirLock(model_dir, "train") holds


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a finished run left behind."""

    model_dir: str
    model_path: str
    history: dict
    epochs_run: int
    best: float | None
    diverged_at_epoch: int | None = None  # first epoch with NaN/inf loss or val metrics


@contextlib.contextmanager
def precision_policy(name: str):
    """Sets the global Keras dtype policy for the block and restores the previous one."""
    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)


def make_strategy(name: str) -> tf.distribute.Strategy:
    """Strategy "default" (one device), "mirrored" (local devices) or "multi_worker" (TF_CONFIG)."""
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def make_optimizer(cfg: RunConfig, steps: int) -> keras.optimizers.Optimizer:
    """Adam / AdamW / SGD with the configured schedule over ``cfg.epochs * steps`` updates."""
    o, total = cfg.optim, max(1, cfg.epochs * steps)
    lr = o.learning_rate
    if o.schedule == "cosine":
        warm = int(o.warmup_epochs * steps)
        lr = keras.optimizers.schedules.CosineDecay(
            0.0 if warm else o.learning_rate,
            decay_steps=max(1, total - warm),
            warmup_target=o.learning_rate if warm else None,
            warmup_steps=warm,
        )
    elif o.schedule == "exponential":
        lr = keras.optimizers.schedules.ExponentialDecay(
            o.learning_rate, decay_steps=max(1, steps), decay_rate=o.decay_rate
        )
    extra = {"clipnorm": o.clipnorm} if o.clipnorm else {}
    if o.name == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9, weight_decay=o.weight_decay or None, **extra)
    # Keras 3's Adam and AdamW are one update (decoupled weight decay); FusedAdam runs it on TF's
    # fused kernel (kd_histo.training.optimizers).
    return FusedAdam(lr, weight_decay=o.weight_decay or None, **extra)


def _distiller(
    cfg: RunConfig, net: keras.Model, teacher: keras.Model | None
) -> ResolutionDistiller:
    d = cfg.distill
    if cfg.mode != "distill":  # teacher and baseline: plain supervised training on one view
        return ResolutionDistiller(
            net,
            None,
            [(1.0, L.MaskedCE())],
            student_view=cfg.view,
            accumulation_steps=d.accumulation_steps,
        )
    if is_embedding_net(teacher):  # label-free: the embedding loss, its head fit after
        return embedding_run.distiller(net, teacher, d)
    if len(d.teachers) > 1 and d.ensemble_features == "off":
        d = dataclasses.replace(d, feature_weight=0.0)
    return ResolutionDistiller(
        net,
        teacher,
        losses_for(d, splits=ensemble.feature_splits(teacher)),
        student_view="lr",
        teacher_view="hr",
        accumulation_steps=d.accumulation_steps,
    )


def train(cfg: RunConfig, extra_callbacks: Sequence[keras.callbacks.Callback] = ()) -> TrainResult:
    """Trains one network as ``cfg`` says and fills ``cfg.model_dir``.

    Args:
      cfg: the resolved run configuration.
      extra_callbacks: appended after the run's own callbacks (tests use one to stop a run).

    Returns:
      A :class:`TrainResult`.

    Raises:
      kd_histo.training.preflight.PreflightError: bad input, found before anything is written.
    """
    info = preflight.check_data(cfg)
    if cfg.data.skip_corrupt:
        skipped = preflight.count_corrupt(cfg, info)
        _LOG.warning(
            f"--skip_corrupt: {sum(skipped.values())} corrupt records skipped ("
            + ", ".join(f"{k} {v}" for k, v in skipped.items())
            + ")"
        )
    preflight.check_teacher_cache(cfg, info)
    preflight.check_teacher(cfg, info)
    cfg = embedding_run.prepare(cfg, log=_LOG.info)
    preflight.check_model_dir(cfg)
    model_dir = os.path.abspath(cfg.model_dir)
    created = not os.path.exists(model_dir)
    os.makedirs(model_dir, exist_ok=True)
    # One writer per run folder: two runs into one folder mixed their history.csv and checkpoints
    # for good. A lock left by a dead process on this host is taken over (as conversion does).
    with DirLock(model_dir, "train", tool="kd-histo-train"):
        try:
            preflight.check_model_dir(
                cfg
            )  # again, under the lock: another run may have finished meanwhile
            return _train(cfg, extra_callbacks, info, model_dir, created)
        except BaseException:
            if created and set(os.listdir(model_dir)) <= {
                LOCK_FILE
            }:  # refused before writing anything
                shutil.rmtree(model_dir, ignore_errors=True)
            raise


def _train(cfg: RunConfig, extra_callbacks, info, model_dir: str, created: bool) -> TrainResult:
    """``train`` once the run folder is checked and locked."""
    counter = cbs.EpochCounter()
    keras.utils.set_random_seed(cfg.seed)
    with precision_policy(cfg.precision):
        strategy = make_strategy(cfg.strategy)
        with strategy.scope():
            teacher = preflight.load_teacher(cfg, info) if cfg.mode == "distill" else None
            net = build_model(
                cfg.net.arch,
                info.num_classes,
                mean=info.mean,
                std=info.std,
                name=cfg.mode,
                stain_reference=domain.stain_reference(cfg, info, teacher),
                **cfg.net.build_kwargs(),
            )
            input_px = preflight.check_input_size(cfg, info, net)
            model = _distiller(cfg, net, teacher)
            steps = cfg.steps_per_epoch or steps_per_epoch(cfg.data, "train")
            if steps < 1:
                raise preflight.PreflightError(
                    f"the train split gives 0 batches of {cfg.data.batch_size}; lower --batch_size"
                )
            model.compile(optimizer=make_optimizer(cfg, steps), jit_compile=False)
        has_val = schema.has_shards(cfg.data.data_dir, "val")
        try:
            write_json(os.path.join(model_dir, CONFIG_JSON), cfg.to_dict())
            first = backup.resume_point(model_dir)  # a damaged backup falls back, named in one line
            train_ds, val_ds, val_steps = _streams(
                cfg, (teacher, net, input_px), steps, first, has_val
            )
            callbacks = _callbacks(cfg, model_dir, net, train_ds, has_val) + [
                counter,
                *extra_callbacks,
            ]
            history = model.fit(
                train_ds,
                epochs=cfg.epochs,
                steps_per_epoch=steps,
                validation_data=val_ds,
                validation_steps=val_steps,
                callbacks=callbacks,
                verbose=cfg.verbose,
            )
        except BaseException:
            if (
                created and counter.finished == 0
            ):  # a failed start leaves no half-written run folder
                for name in os.listdir(model_dir):  # all but the lock, which its owner removes
                    if name != LOCK_FILE:
                        path = os.path.join(model_dir, name)
                        if os.path.isdir(path):
                            shutil.rmtree(path, ignore_errors=True)
                        else:
                            os.remove(path)
            raise
        return _finish(
            cfg, model_dir, net, history.history, counter.finished, has_val, input_px, info
        )


def _streams(cfg: RunConfig, nets, steps: int, first_epoch: int, has_val: bool):
    """(training stream from ``first_epoch`` on, validation stream or None, validation steps).

    fit() asks for exactly ``steps`` batches per epoch; epoch ``e``'s batches are a pure function
    of the seed and ``e`` (``training_stream``), so a resumed run reads what the uninterrupted
    one read. Validation: Keras restarts its iterator at every epoch's evaluation, so each epoch
    validates on the same first ``val_steps`` batches, resumed or not; the stream repeats and its
    count comes from dataset.json (an unknown count made Keras warn that the input "ran out of
    data" at every run's start).
    """
    teacher, net, input_px = nets
    cache_dir = preflight.teacher_cache_dir(cfg) if cfg.mode == "distill" else ""
    if cache_dir:
        train_ds, val_ds = _cached_streams(
            cfg, cache_dir, teacher, net, input_px, has_val, steps, first_epoch
        )
    else:
        train_ds = training_stream(cfg.data, "train", steps=steps, first_epoch=first_epoch)
        val_ds = make_dataset(cfg.data, "val", training=False) if has_val else None
    if val_ds is None:
        return train_ds, None, None
    val_steps = cfg.val_steps or steps_per_epoch(cfg.data, "val", training=False)
    return train_ds, val_ds.repeat(), val_steps


def _cached_streams(
    cfg: RunConfig, cache_dir: str, teacher, net, input_px, has_val, steps, first_epoch
):
    """The training stream (from ``first_epoch`` on, ``steps`` batches an epoch) and the
    validation pass (not repeated) with the teacher's outputs read from caches (built when
    needed).

    The training pipeline runs without augmentation; its cache draws one dihedral transform per
    example for both views (the "flips" preset) from the epoch's own seed, so the teacher is
    never run during training. Validation reads the un-augmented val tiles, whose teacher
    outputs ``<cache_dir>/val`` holds, so the teacher is not run there either (None when the
    data has no val split).
    """
    from kd_histo.training import teacher_cache

    kwargs = {
        "map_size": _map_size(net, input_px),
        "feature_mode": cfg.distill.feature_mode,
        "log": _LOG.info,
    }
    teacher_file = preflight.teacher_source(cfg)
    cache = teacher_cache.for_training(teacher, teacher_file, cfg.data, cache_dir, **kwargs)
    train_ds = training_stream(
        dataclasses.replace(cfg.data, augment="none"),
        "train",
        steps=steps,
        first_epoch=first_epoch,
        per_epoch=lambda batches, seed: cache.attach(batches, training=True, seed=seed),
    )
    if not has_val:
        return train_ds, None
    val_cache = teacher_cache.for_validation(teacher, teacher_file, cfg.data, cache_dir, **kwargs)
    return train_ds, val_cache.attach(make_dataset(cfg.data, "val", training=False), training=False)


def _map_size(net: keras.Model, input_px: int) -> tuple[int, int]:
    """(h, w) of the net's last feature map for an input tile of ``input_px``."""
    spec = net.compute_output_spec(keras.KerasTensor((1, input_px, input_px, 3)))
    return tuple(int(v) for v in spec["features"].shape[1:3])


def prebuild_teacher_caches(cfgs: Sequence[RunConfig], log=print) -> int:
    """Builds the teacher caches of several distillation runs before they train, running each
    teacher once over the tiles they share (:func:`kd_histo.training.teacher_cache.prebuild`).

    For runs that would each build their own cache for another student size (the protocol's x2,
    x4 and x8 students of one teacher): the caches are exactly those the runs would build, and
    each run then finds its cache fitting. Runs without a cache are left out; preflight checks
    still run in each run.

    Returns:
      How many caches were built.
    """
    from kd_histo.training import teacher_cache

    by_teacher: dict[tuple, list[RunConfig]] = {}
    for cfg in cfgs:
        if cfg.mode == "distill" and cfg.distill.teacher_cache:
            key = (preflight.teacher_source(cfg), cfg.precision)
            by_teacher.setdefault(key, []).append(cfg)
    built = 0
    for (source, precision), group in by_teacher.items():
        uses = []
        with precision_policy(precision):
            for cfg in group:
                info = preflight.check_data(cfg)
                preflight.check_teacher_cache(cfg, info)
                net = build_model(
                    cfg.net.arch,
                    info.num_classes,
                    mean=info.mean,
                    std=info.std,
                    name="probe",
                    **cfg.net.build_kwargs(),
                )
                input_px = preflight.check_input_size(cfg, info, net)
                uses.append(
                    teacher_cache.CacheUse(
                        cfg.data,
                        preflight.teacher_cache_dir(cfg),
                        _map_size(net, input_px),
                        cfg.distill.feature_mode,
                        validation=schema.has_shards(cfg.data.data_dir, "val"),
                    )
                )
            teacher = preflight.load_teacher(group[0], info)
            built += teacher_cache.prebuild(teacher, source, uses, log=log)
        keras.backend.clear_session()
    return built


def _callbacks(cfg: RunConfig, model_dir: str, net: keras.Model, train_ds, has_val: bool) -> list:
    logs = os.path.join(model_dir, "logs")
    first, last = cfg.profile_steps
    out = [
        keras.callbacks.TerminateOnNaN(),
        cbs.TerminateOnNonFiniteVal(),
        cbs.HistoryCSV(os.path.join(model_dir, "history.csv")),
        keras.callbacks.TensorBoard(
            logs, profile_batch=(first, last) if last > 0 else 0, update_freq="epoch"
        ),
    ]
    if has_val:
        os.makedirs(os.path.join(model_dir, "checkpoints"), exist_ok=True)
        out.append(
            cbs.SaveBestNet(net, os.path.join(model_dir, "checkpoints", "best.keras"), cfg.monitor)
        )
    if cfg.image_grids:
        out.append(cbs.ImageGrids(next(iter(train_ds)), logs))
    # Last of the run's own: the backup of an epoch exists only once its history row and best
    # checkpoint do, so a kill before it redoes the epoch (a backup written first resumed after
    # an epoch that a kill had kept out of history.csv). A callback that stops the run (NaN)
    # only flags it: the epoch's callbacks all run.
    out.append(backup.AtomicBackupAndRestore(os.path.join(model_dir, "backup")))
    return out


def _finish(cfg, model_dir, net, history, epochs_run, has_val, input_px, info) -> TrainResult:
    # A diverged run is reported by the caller, from the result (the binary's error line).
    net, best, diverged = divergence.kept_network(model_dir, net, has_val)
    probe = None
    if embedding_run.embedding_teacher(cfg):  # the head, fit on the frozen features
        probe = embedding_run.fit_heads(cfg, net, info, has_val, model_dir, log=_LOG.info)
    stats = domain.fit_ood(cfg, net, info.num_classes, has_val, log=_LOG.info)
    if stats is not None:
        stats.save(model_dir)
    model_path = os.path.join(model_dir, MODEL_FILE)
    net.save(model_path)
    saved = os.path.join(model_dir, "savedmodel")
    shutil.rmtree(saved, ignore_errors=True)
    net.export(saved, verbose=False)
    # A keras-cv backbone reads pixels as its preset expects, not by the data set's mean/std.
    mean, std = input_normalisation(net) if is_keras_cv(cfg.net.arch) else (info.mean, info.std)
    write_run_record(
        model_dir,
        RunRecord(
            mode=cfg.mode,
            view=cfg.view,
            factor=cfg.data.factor if cfg.view == "lr" else 1.0,
            lr_method=cfg.data.lr_method,
            hr_px=cfg.data.hr_px or info.tile_px,
            input_px=input_px,
            mpp=info.mpp if info.mpp > 0 else None,
            class_names=tuple(info.class_names),
            mean=mean,
            std=std,
            arch=cfg.net.arch,
            monitor=cfg.monitor if has_val else None,
            best=best,
            epochs=cfg.epochs,
            epochs_run_this_process=epochs_run,
            data_dir=cfg.data.data_dir,
            model=MODEL_FILE,
            savedmodel="savedmodel",
            diverged_at_epoch=diverged,
            stain_reference=stain_reference_of(net),
            ood_threshold=stats.threshold if stats is not None else None,
            linear_probe=probe,
        ),
    )
    return TrainResult(model_dir, model_path, history, epochs_run, best, diverged)
