"""Checks a training run makes BEFORE it writes anything: bad input fails in seconds, in one line.

Each check raises :class:`PreflightError` (a ``ValueError``) whose message says what to fix:
data folder and splits (the shards are the ones ``dataset.json`` describes: no shard missing, no
empty or damaged shard, the record counts it states), the run folder (writable, free space, not a
finished or different run), the teacher (a run folder with a run record that fits the data:
``run_record.teacher_misfit``, the check the cascade makes too; the file exists, loads, same class
count, RGB input), and the LR tile against the network's minimum input (its total stride).

Not here: building or training anything (``kd_histo.training.train``); the run folder's file
names and finding a network's run record (``kd_histo.training.run_record``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence

import keras

from kd_histo import schema
from kd_histo.data import decode
from kd_histo.data.pipeline import lr_size
from kd_histo.models import load_model
from kd_histo.training import ensemble, foreign
from kd_histo.training.config import RunConfig
from kd_histo.training.run_record import (
    CONFIG_JSON,
    RUN_JSON,
    RunRecord,
    model_file,
    record_of_model,
    teacher_misfit,
)
from kd_histo.training.teacher_cache import CACHEABLE_AUGMENT, EnsembleSource

MIN_FREE_MB = 50  # a run folder needs room for a few checkpoints of the nets we train


class PreflightError(ValueError):
    """A run cannot start; the message says what to fix."""


def check_data(cfg: RunConfig) -> schema.DatasetInfo:
    """The data folder has dataset.json, train shards and (unless allowed) val shards."""
    try:
        info = schema.DatasetInfo.read(cfg.data.data_dir)
    except (FileNotFoundError, schema.SchemaError) as e:
        raise PreflightError(str(e)) from None
    if cfg.mode != "distill" and not (cfg.data.labeled and cfg.data.unlabeled_ratio < 1.0):
        raise PreflightError(
            f"mode {cfg.mode!r} learns from labels: drop --nolabeled / use --unlabeled_ratio < 1"
        )
    needs_train = cfg.data.labeled and cfg.data.unlabeled_ratio < 1.0
    _check_two_classes(cfg.data.data_dir, info, needs_train)
    splits = ["train"] if needs_train else []
    for split in splits:
        try:
            schema.shard_paths(cfg.data.data_dir, split)
        except FileNotFoundError as e:
            raise PreflightError(str(e)) from None
    for d in cfg.data.unlabeled_dirs:
        if not os.path.isfile(os.path.join(d, schema.DATASET_JSON)):
            raise PreflightError(
                f"unlabeled data folder {d} has no dataset.json; convert it with kd-histo-convert"
            )
    if not cfg.allow_no_val and not schema.has_shards(cfg.data.data_dir, "val"):
        raise PreflightError(
            f"{cfg.data.data_dir} has no 'val' split to pick the best epoch; convert with a val "
            "fraction, or pass --allow_no_val to keep the last epoch"
        )
    if (cfg.data.hr_px or info.tile_px) > info.tile_px:
        raise PreflightError(
            f"hr_px {cfg.data.hr_px} is larger than the stored {info.tile_px} px tiles; lower "
            "--hr_px"
        )
    try:
        for split in ("train", "val", "unlabeled"):
            check_shards(cfg.data.data_dir, info, split, count=not cfg.data.skip_corrupt)
    except schema.SchemaError as e:
        raise PreflightError(str(e)) from None
    return info


def _check_two_classes(data_dir: str, info: schema.DatasetInfo, labeled: bool) -> None:
    """A classifier needs two classes: in dataset.json, and (``labeled``) in the train split."""
    if len(info.class_names) < 2:
        raise PreflightError(
            f"{data_dir} has one class ({', '.join(info.class_names) or 'none'}); a classifier "
            "needs at least two: convert the other classes' tiles too"
        )
    present = [c for c, n in info.counts.get("train", {}).items() if n > 0 and c != "unlabeled"]
    if labeled and len(present) == 1:
        raise PreflightError(
            f"{data_dir}: the train split holds one class ({present[0]}); a classifier needs at "
            "least two: convert again with tiles of the other classes"
        )


def check_shards(data_dir: str, info: schema.DatasetInfo, split: str, count: bool = True) -> None:
    """A split's shard files are all there and (``count``) hold the records dataset.json states.

    A split with no shard file at all is left to the split checks (a missing val split is allowed
    with --allow_no_val). Counting reads only the framing of uncompressed shards (GZIP ones are not
    counted).

    Raises:
      SchemaError: a shard is missing, extra, empty or damaged, or the counts disagree.
    """
    if not schema.has_shards(data_dir, split):
        return
    paths = schema.shard_paths(data_dir, split)
    listed = info.shards.get(split, 0)
    names = sorted(os.path.basename(p) for p in paths)
    want = [schema.shard_name(split, k, listed, info.compression) for k in range(listed)]
    if names != want:
        missing = sorted(set(want) - set(names))
        extra = sorted(set(names) - set(want))
        raise schema.SchemaError(
            f"{data_dir}: dataset.json lists {listed} '{split}' shards but the folder differs"
            + (f"; missing {', '.join(missing[:3])}" if missing else "")
            + (f"; not listed {', '.join(extra[:3])}" if extra else "")
            + ": restore the files or reconvert the data"
        )
    if not count or info.compression:
        return
    n = 0
    for p in paths:
        k = decode.count_records(p)
        if k == 0:
            raise schema.SchemaError(f"shard {p} holds no records; reconvert the data")
        n += k
    stated = info.num_examples(split)
    if n != stated:
        raise schema.SchemaError(
            f"{data_dir}: dataset.json counts {stated} '{split}' records but its shards hold {n}; "
            "dataset.json and the shards disagree: reconvert the data"
        )


def count_corrupt(cfg: RunConfig, info: schema.DatasetInfo) -> dict[str, int]:
    """With ``skip_corrupt``: per split, the records training will skip (one read of the data).

    A record is skipped when it does not parse or decode, or lies after the damage in a damaged
    shard; the count is what dataset.json states minus what reads back.
    """
    lr_px = (
        lr_size(info.tile_px, info.lr_factor)
        if cfg.data.lr_method == "pyramid" and info.lr_factor
        else 0
    )
    out = {}
    for split in ("train", "val", "unlabeled"):
        if not schema.has_shards(cfg.data.data_dir, split):
            continue
        ds = decode.read_shards(
            schema.shard_paths(cfg.data.data_dir, split),
            tile_px=info.tile_px,
            lr_tile_px=lr_px,
            compression=info.compression,
            skip_corrupt=True,
        )
        readable = int(ds.reduce(0, lambda n, _: n + 1))
        out[split] = max(0, info.num_examples(split) - readable)
    return out


def check_teacher_cache(cfg: RunConfig, info: schema.DatasetInfo) -> None:
    """A teacher cache only fits a distill run whose views are a finite set (no random crop)."""
    if not cfg.distill.teacher_cache:
        return
    if cfg.mode != "distill":
        raise PreflightError(f"--teacher_cache is for distill runs, not {cfg.mode!r}; drop it")
    if cfg.data.augment not in CACHEABLE_AUGMENT:
        raise PreflightError(
            f"a teacher cache holds the flips/rotations only, not augment {cfg.data.augment!r}; "
            "use --augment=flips (or none), or drop --teacher_cache"
        )
    if (cfg.data.hr_px or info.tile_px) != info.tile_px:
        raise PreflightError(
            f"--hr_px {cfg.data.hr_px} makes random crops of the {info.tile_px} px tiles, which "
            "a teacher cache cannot hold; drop --hr_px or --teacher_cache"
        )


def teacher_cache_dir(cfg: RunConfig) -> str:
    """The cache folder of a run ("auto" = ``<model_dir>/teacher_cache``; "" = no cache)."""
    path = cfg.distill.teacher_cache
    return os.path.join(cfg.model_dir, "teacher_cache") if path == "auto" else path


def check_model_dir(cfg: RunConfig) -> None:
    """The run folder can be written and is new, or holds this same run's unfinished state."""
    d = os.path.abspath(cfg.model_dir)
    if os.path.exists(d) and not os.path.isdir(d):
        raise PreflightError(f"model_dir {d} is a file; pass a folder path")
    existing = d
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise PreflightError(
            f"model_dir {d} lies under {existing}, which is a file; choose another --model_dir"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PreflightError(
            f"model_dir {d} is not writable ({existing} is read-only); choose another --model_dir"
        )
    try:  # access() can pass where writes fail (read-only mounts, quotas): try one
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".kd_histo_probe"):
            pass
    except OSError as e:
        raise PreflightError(
            f"cannot write into {existing} ({e.strerror}); choose another --model_dir"
        ) from None
    free_mb = shutil.disk_usage(existing).free / 2**20
    if free_mb < MIN_FREE_MB:
        raise PreflightError(
            f"only {free_mb:.0f} MB free under {existing} (need {MIN_FREE_MB}); free disk space"
        )
    if os.path.isfile(os.path.join(d, RUN_JSON)):
        raise PreflightError(f"model_dir {d} holds a finished run; choose a new --model_dir")
    old = os.path.join(d, CONFIG_JSON)
    if os.path.isfile(old):
        if not cfg.resume:
            raise PreflightError(
                f"model_dir {d} holds an unfinished run; pass --resume to continue it or a new "
                "--model_dir"
            )
        with open(old) as f:
            before = json.load(f)
        try:  # settings added since the run started read as their defaults (what they were then)
            before = json.loads(RunConfig.from_dict(before).to_json())
        except (TypeError, ValueError, KeyError):
            pass  # compared as written
        now = json.loads(cfg.to_json())  # tuples become lists, as in the file
        before, now = _cache_read_or_not(before), _cache_read_or_not(now)
        differ = sorted(
            k for k in now if k not in ("resume", "verbose") and before.get(k) != now[k]
        )
        if differ:
            raise PreflightError(
                f"model_dir {d} holds a run with other settings ({', '.join(differ)}); "
                "use the same flags to resume or a new --model_dir"
            )


def _cache_read_or_not(config: dict) -> dict:
    """A config.json as a resume compares it: the teacher cache by whether one is read, not by
    its folder. A cache holds what its teacher, views and sources make, wherever it lies (a folder
    that does not fit is rebuilt with the same outputs), so a run resumes where the protocol moved
    its cache (the ensemble students' per-seed caches became one per factor)."""
    distill = config.get("distill")
    if not isinstance(distill, dict) or "teacher_cache" not in distill:
        return config
    return {**config, "distill": {**distill, "teacher_cache": bool(distill["teacher_cache"])}}


def teacher_record(cfg: RunConfig, path: str | None = None, class_names=()) -> RunRecord | None:
    """The run record of the teacher (``path``: one member of an ensemble; default the first), or
    None for a model file that is not its run folder's model
    (:func:`kd_histo.training.run_record.record_of_model`). ``class_names``: the data's, taken by
    an embedding-only foreign teacher (which has none)."""
    path = path or cfg.distill.teachers[0]
    try:
        if foreign.is_foreign(path):  # a model from elsewhere: its teacher.json states the facts
            return foreign.record_of(foreign.read_teacher_json(path), class_names)
        return record_of_model(path)
    except (FileNotFoundError, ValueError) as e:
        named = f" {path}" if len(cfg.distill.teachers) > 1 else ""
        raise PreflightError(f"teacher{named}: {e}") from None


def check_teacher(cfg: RunConfig, info: schema.DatasetInfo) -> None:
    """The teacher fits the data of a distill run (``run_record.teacher_misfit``): an HR run, the
    data's class names in the data's order, the HR view's tile size and (where both are known) its
    µm per pixel. Each member of an ensemble teacher is checked, so members that disagree with one
    another are refused by the first that disagrees with the data, named."""
    if cfg.mode != "distill":
        return
    for name in cfg.distill.teachers:
        record = teacher_record(cfg, name, info.class_names)
        if record is not None:  # a foreign teacher's facts are its teacher.json's: name that
            label = foreign.teacher_json(name) if foreign.is_foreign(name) else name
            _check_teacher_fits(label, record, cfg, info)


def _check_teacher_fits(name: str, record: RunRecord, cfg: RunConfig, info) -> None:
    data_dir = cfg.data.data_dir
    hr_px = cfg.data.hr_px or info.tile_px
    misfit = teacher_misfit(record, info.class_names, hr_px, info.mpp)
    if misfit == "view":
        raise PreflightError(
            f"teacher {name} is a low-resolution {record.mode} run (view {record.view}, factor "
            f"{record.factor:g}); a teacher must see HR tiles: train one with --mode=teacher"
        )
    if misfit == "classes":
        order = (
            " (the same names in another order)"
            if sorted(record.class_names) == sorted(info.class_names)
            else ""
        )
        raise PreflightError(
            f"teacher {name} has classes {list(record.class_names)} but {data_dir} has "
            f"{list(info.class_names)}{order}; convert the data with --class_names="
            f"{','.join(record.class_names)} or train a teacher on this data"
        )
    if misfit == "hr_px":
        raise PreflightError(
            f"teacher {name} was trained on {record.hr_px} px HR tiles but this run's HR view is "
            f"{hr_px} px ({data_dir}); use data converted like the teacher's (--tile_px, or "
            "--hr_px to crop larger tiles) or train a teacher on this data"
        )
    if misfit == "mpp":
        raise PreflightError(
            f"teacher {name} was trained on {record.mpp:g} µm/px tiles but {data_dir} has "
            f"{info.mpp:g} µm/px; convert the data at the teacher's resolution"
        )


def load_teacher(cfg: RunConfig, info: schema.DatasetInfo) -> keras.Model:
    """Loads the distillation teacher and checks it fits the data set (classes, RGB input) and has
    a run record (see :func:`check_teacher`). Several teachers are loaded as one ensemble
    (:func:`kd_histo.training.ensemble.build_ensemble`) at the run's KD temperature."""
    names = cfg.distill.teachers
    members = []
    for name in names:
        if foreign.is_foreign(name):
            members.append(_load_foreign(cfg, name, info))
            continue
        try:
            members.append(load_model(model_file(name), expected_num_classes=info.num_classes))
        except (FileNotFoundError, ValueError) as e:
            raise PreflightError(f"teacher: {e}") from None
        if teacher_record(cfg, name) is None:
            raise PreflightError(
                f"teacher {name} has no run.json beside it, so nothing says which class "
                "order, tile size and µm/px it was trained on; pass its kd-histo-train run folder"
            )
    if len(members) == 1:
        return members[0]
    try:
        return ensemble.build_ensemble(
            members, names, cfg.distill.temperature, features=_member_maps(cfg)
        )
    except ValueError as e:
        raise PreflightError(str(e)) from None


def _load_foreign(cfg: RunConfig, name: str, info) -> keras.Model:
    """A foreign teacher (:mod:`kd_histo.training.foreign`) as a kd_histo net."""
    try:
        spec = foreign.read_teacher_json(name)
        if spec.logits and not spec.features and cfg.distill.feature_weight > 0:
            raise foreign.ForeignTeacherError(
                f"{foreign.teacher_json(name)} names no feature map (features) for the feature "
                "loss; name one, or pass --feature_weight=0"
            )
        return foreign.load_foreign(name, spec, info.num_classes)
    except (OSError, ValueError) as e:
        raise PreflightError(f"teacher: {str(e).splitlines()[0]}") from None


def _teacher_file(name: str) -> str:
    """The file (or SavedModel folder) that identifies a teacher's outputs."""
    return name if foreign.is_foreign(name) else model_file(name)


def teacher_source(cfg: RunConfig):
    """What identifies the teacher's outputs for a teacher cache: its model file, or for an
    ensemble a :class:`kd_histo.training.teacher_cache.EnsembleSource`."""
    d = cfg.distill
    if len(d.teachers) == 1:
        return _teacher_file(d.teachers[0])
    files = tuple(_teacher_file(t) for t in d.teachers)
    return EnsembleSource(files, d.temperature, _member_maps(cfg))


def _member_maps(cfg: RunConfig) -> bool:
    """Whether an ensemble teacher's features are its members' maps (for the feature loss)."""
    return cfg.distill.ensemble_features == "projected" and cfg.distill.feature_weight > 0


def net_stride(net: keras.Model, probe_px: int = 256) -> int:
    """Total downsampling of the net's last feature map (input px per feature-map cell)."""
    spec = net.compute_output_spec(keras.KerasTensor((1, probe_px, probe_px, 3)))
    return max(1, round(probe_px / int(spec["features"].shape[1])))


def check_input_size(cfg: RunConfig, info: schema.DatasetInfo, net: keras.Model) -> int:
    """The net's input tile is at least its total stride; returns the input px.

    Below the stride the last feature map is a single cell computed mostly from padding, so the
    feature-map loss and the classifier see almost nothing of the tile.
    """
    hr_px = cfg.data.hr_px or info.tile_px
    px = hr_px if cfg.view == "hr" else lr_size(hr_px, cfg.data.factor)
    stride = net_stride(net)
    if px < stride:
        raise PreflightError(
            f"the {cfg.view.upper()} tile is {px} px ({hr_px} px / factor {cfg.data.factor:g}) but "
            f"the net needs at least {stride} px (its total stride); use a smaller factor, a "
            "larger "
            "--hr_px, or --stem=small"
        )
    return px


def check_input_sizes(cfgs: Sequence[RunConfig]) -> None:
    """:func:`check_input_size` for several runs before any trains (an experiment's factors):
    each run's data checks too, and one net is built per architecture and view size."""
    from kd_histo.models import build_model

    seen = set()
    for cfg in cfgs:
        key = (cfg.net, cfg.view, cfg.data.factor, cfg.data.hr_px, cfg.data.data_dir)
        if key in seen:
            continue
        seen.add(key)
        info = check_data(cfg)
        net = build_model(
            cfg.net.arch,
            info.num_classes,
            mean=info.mean,
            std=info.std,
            name="probe",
            **cfg.net.build_kwargs(),
        )
        check_input_size(cfg, info, net)
    keras.backend.clear_session()
