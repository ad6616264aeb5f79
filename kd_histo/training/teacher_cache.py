"""Which teacher-output cache a distillation run reads, and when it is reused or (re)built.

A cache (its files: :mod:`kd_histo.training.cache_store`) fits a run when it was built from the
same teacher file for the same views and covers every source the run reads as it is now
(:func:`for_training`; the val split's cache: :func:`for_validation`). ``built_for.json`` records
what a cache was built for and is written last. :func:`prebuild` builds the caches of several runs
of one teacher (a protocol's students of every factor) with one teacher pass over the tiles they
share.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import keras

from kd_histo import schema
from kd_histo.atomic import write_json
from kd_histo.data.augment import NUM_DIHEDRAL
from kd_histo.progress import progress
from kd_histo.training import losses as L
from kd_histo.training.cache_store import CacheTarget, TeacherCache, build_caches

if TYPE_CHECKING:
    from kd_histo.data.pipeline import PipelineConfig

BUILT_FOR = "built_for.json"
IN_MEMORY_BYTES = 1 << 30  # smaller caches are gathered from memory, larger ones read from disk
CACHEABLE_AUGMENT = ("none", "flips")  # flips = the 8 dihedral transforms the cache stores


def training_sources(data) -> list[tuple[str, str]]:
    """(data_dir, split) pairs the training stream of a PipelineConfig can read.

    The labeled ``train`` split when labeled tiles are drawn, and the whole unlabeled pool (every
    fraction of it is a subset) when unlabeled tiles are drawn.
    """
    from kd_histo.data.pipeline import unlabeled_sources

    out = []
    if data.labeled and data.unlabeled_ratio < 1.0:
        out.append((os.path.abspath(data.data_dir), "train"))
    if data.unlabeled_ratio > 0.0 or not data.labeled:
        out += [(os.path.abspath(d), s) for d, splits in unlabeled_sources(data) for s in splits]
    return out


def _sha256(path: str, limit: int | None = None) -> str:
    """SHA-256 of a file, or of its first and last ``limit`` bytes when it is over 2x that."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if limit is None or size <= 2 * limit:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(limit))
            f.seek(size - limit)
            h.update(f.read(limit))
    return h.hexdigest()


def _teacher_identity(path: str) -> dict:
    """The teacher file by path, size, mtime and its bytes' SHA-256 (another teacher saved over
    the same path, even keeping size and mtime, is another teacher)."""
    if os.path.isdir(path):  # a SavedModel teacher (kd_histo.training.foreign): every file
        files = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names)
        h = hashlib.sha256()
        for f in files:
            h.update(f"{os.path.relpath(f, path)} {_sha256(f)}\n".encode())
        return {"path": os.path.realpath(path), "sha256": h.hexdigest()}
    st = os.stat(path)
    return {
        "path": os.path.realpath(path),
        "bytes": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": _sha256(path),
    }


@dataclasses.dataclass(frozen=True)
class EnsembleSource:
    """An ensemble teacher's identity for its caches: every member's model file, the temperature
    its logits are for, and whether its features are the members' maps
    (:mod:`kd_histo.training.ensemble`). A cache fits only while every member file is unchanged."""

    paths: tuple[str, ...]
    temperature: float
    member_maps: bool


def _identity(teacher_path: str | EnsembleSource) -> dict:
    """A single teacher's :func:`_teacher_identity` (as caches built before ensembles recorded
    it), or an ensemble's: each member's, its temperature and feature setting."""
    if isinstance(teacher_path, str):
        return _teacher_identity(teacher_path)
    return {
        "members": [_teacher_identity(p) for p in teacher_path.paths],
        "temperature": teacher_path.temperature,
        "member_maps": teacher_path.member_maps,
    }


def _source_identity(data_dir: str, split: str) -> tuple[str, str, str]:
    """(data_dir, split, fingerprint): the fingerprint changes whenever the split's shards or the
    folder's dataset.json do (a reconversion with other settings keeps the paths and the record
    keys but not the pixels). Each shard counts by name, size, mtime and the SHA-256 of its first
    and last MiB; dataset.json by its SHA-256."""
    h = hashlib.sha256(_sha256(os.path.join(data_dir, schema.DATASET_JSON)).encode())
    for p in schema.shard_paths(data_dir, split):
        st = os.stat(p)
        h.update(
            f"{os.path.basename(p)} {st.st_size} {st.st_mtime_ns} {_sha256(p, 1 << 20)}\n".encode()
        )
    return os.path.realpath(data_dir), split, h.hexdigest()


def _is_current(source: tuple[str, str, str]) -> bool:
    try:
        return _source_identity(source[0], source[1]) == tuple(source)
    except (OSError, ValueError):  # the folder or split is gone
        return False


def for_training(
    teacher: keras.Model,
    teacher_path: str,
    data,
    cache_dir: str,
    *,
    map_size: tuple[int, int],
    feature_mode: str,
    bicubic_style: str = L.BICUBIC_STYLE,
    log=print,
) -> TeacherCache:
    """The cache a distillation run reads: reused when it fits the run, else (re)built.

    A cache fits when it was built from the same teacher file (path, size, mtime, SHA-256) for the
    same views (HR crop, factor, LR method, augmentation, student map size, feature resize) and
    covers every source the run reads (:func:`training_sources`) as it is now (shards and
    dataset.json fingerprinted, :func:`_source_identity`: a reconverted folder is another
    source), so runs that differ only in how much of the unlabeled pool they draw share one
    cache. ``built_for.json`` is written last: a build cut short is never mistaken for a finished
    cache.

    Args:
      teacher: the frozen teacher net.
      teacher_path: its ``.keras`` file (identifies the teacher), or an ensemble's
        :class:`EnsembleSource`.
      data: the run's PipelineConfig (augment "none" or "flips", no random crop).
      cache_dir: where the cache lives.
      map_size: (h, w) of the student's feature map at the LR input size.
      feature_mode: how the teacher map is resized to ``map_size``.
      bicubic_style: "torch" or "tf" bicubic kernel.
      log: receives one line when the cache is built.

    Returns:
      The opened cache (in memory when its arrays take less than 1 GiB as float32).
    """
    if data.augment not in CACHEABLE_AUGMENT:
        raise ValueError(
            f"a teacher cache holds the {CACHEABLE_AUGMENT} augmentations only, not "
            f"{data.augment!r}; use --augment=flips or drop --teacher_cache"
        )
    return _fitting_cache(
        teacher,
        teacher_path,
        data,
        cache_dir,
        training_sources(data),
        dihedral=data.augment == "flips",
        map_size=map_size,
        feature_mode=feature_mode,
        bicubic_style=bicubic_style,
        log=log,
    )


VALIDATION_SUBDIR = "val"


def for_validation(
    teacher: keras.Model,
    teacher_path: str,
    data,
    cache_dir: str,
    *,
    map_size: tuple[int, int],
    feature_mode: str,
    bicubic_style: str = L.BICUBIC_STYLE,
    log=print,
) -> TeacherCache:
    """The cache of the teacher's outputs on the ``val`` split (identity view only).

    Validation sees every val tile once per epoch, un-augmented, so the frozen teacher's outputs
    there never change either; without a cache each epoch's validation runs the teacher on every
    HR val tile (about 40% of a cached x8 student's epoch on LC25000). Lives in
    ``<cache_dir>/val`` and is reused or rebuilt by the same rules as :func:`for_training`.
    Attach it with ``attach(val_batches, training=False)``.
    """
    return _fitting_cache(
        teacher,
        teacher_path,
        data,
        os.path.join(cache_dir, VALIDATION_SUBDIR),
        [(os.path.abspath(data.data_dir), "val")],
        dihedral=False,
        map_size=map_size,
        feature_mode=feature_mode,
        bicubic_style=bicubic_style,
        log=log,
    )


@dataclasses.dataclass(frozen=True)
class _Build:
    """A cache that does not fit its run yet: what to build and over which sources."""

    target: CacheTarget
    settings: dict
    sources: tuple[tuple[str, str, str], ...]
    dihedral: bool
    data: PipelineConfig  # the run's (its HR view is the teacher's input)


def _needed_build(
    teacher_path: str,
    data,
    cache_dir: str,
    need_splits,
    *,
    dihedral: bool,
    map_size,
    feature_mode: str,
    bicubic_style: str,
) -> _Build | None:
    """None when the cache in ``cache_dir`` fits the views and covers ``need_splits``
    ([(data_dir, split)]); else what to (re)build (see :func:`for_training`)."""
    settings = {
        "teacher": _identity(teacher_path),
        "hr_px": data.hr_px,
        "factor": data.factor,
        "lr_method": data.lr_method,
        "dihedral": dihedral,
        "map_size": list(map_size),
        "feature_mode": feature_mode,
        "bicubic_style": bicubic_style,
    }
    need = [_source_identity(d, split) for d, split in need_splits]
    meta_path = os.path.join(cache_dir, BUILT_FOR)
    covered: list[tuple[str, str, str]] = []
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta["settings"] == settings:
            covered = [
                tuple(s) for s in meta["sources"] if len(s) == 3
            ]  # older caches: no fingerprints
    if set(need) <= set(covered):
        return None
    # keep what the cache covers of other sources only while those are unchanged
    sources = tuple(sorted(set(need) | {c for c in covered if _is_current(c)}))
    target = CacheTarget(cache_dir, tuple(int(v) for v in map_size), feature_mode, bicubic_style)
    return _Build(target, settings, sources, dihedral, data)


def _build(teacher, builds: Sequence[_Build], log) -> None:
    """Builds the caches, one teacher pass for all that read the same sources and HR view."""
    from kd_histo.data.pipeline import PipelineConfig, batch_tiles, make_dataset

    groups: dict[tuple, list[_Build]] = {}
    for b in builds:
        groups.setdefault((b.sources, b.dihedral, b.data.hr_px), []).append(b)
    for (sources, all_eight, _), group in groups.items():
        for b in group:
            meta_path = os.path.join(b.target.cache_dir, BUILT_FOR)
            if os.path.isfile(meta_path):
                os.remove(meta_path)  # the files below are about to change
        data = group[0].data
        view = PipelineConfig(
            data.data_dir,
            batch_size=64,
            factor=data.factor,
            hr_px=data.hr_px,
            lr_method=data.lr_method,
            augment="none",
        )
        batches = None
        for d, split, _ in sources:
            part = make_dataset(dataclasses.replace(view, data_dir=d), split, training=False)
            batches = part if batches is None else batches.concatenate(part)
        n_t = NUM_DIHEDRAL if all_eight else 1
        into = ", ".join(b.target.cache_dir for b in group)
        log(f"teacher cache: running the teacher {n_t}x over {len(sources)} source(s) into {into}")
        n = sum(schema.DatasetInfo.read(d).num_examples(split) for d, split, _ in sources)
        batches = progress(batches, total=n, desc="teacher cache", unit="tiles", size=batch_tiles)
        build_caches(teacher, batches, [b.target for b in group], dihedral_transforms=all_eight)
        for b in group:  # written last: a build cut short is never taken for a finished cache
            write_json(
                os.path.join(b.target.cache_dir, BUILT_FOR),
                {"settings": b.settings, "sources": list(b.sources)},
                sort_keys=False,
            )


def _open(cache_dir: str) -> TeacherCache:
    cache = TeacherCache(cache_dir)
    s = cache.spec
    nbytes = (
        s.num_examples
        * s.num_transforms
        * (s.num_classes + s.map_size[0] * s.map_size[1] * s.channels)
        * 4
    )
    return TeacherCache(cache_dir, in_memory=True) if nbytes < IN_MEMORY_BYTES else cache


def _fitting_cache(
    teacher,
    teacher_path: str,
    data,
    cache_dir: str,
    need_splits,
    *,
    dihedral: bool,
    map_size,
    feature_mode: str,
    bicubic_style: str,
    log,
) -> TeacherCache:
    """Opens the cache in ``cache_dir`` when it fits the views and covers ``need_splits``
    ([(data_dir, split)]), else (re)builds it; see :func:`for_training`."""
    build = _needed_build(
        teacher_path,
        data,
        cache_dir,
        need_splits,
        dihedral=dihedral,
        map_size=map_size,
        feature_mode=feature_mode,
        bicubic_style=bicubic_style,
    )
    if build is not None:
        _build(teacher, [build], log)
    return _open(cache_dir)


@dataclasses.dataclass(frozen=True)
class CacheUse:
    """One distillation run's caches, as :func:`for_training` and :func:`for_validation` would
    open them: its PipelineConfig, cache folder and student feature-map size."""

    data: PipelineConfig
    cache_dir: str
    map_size: tuple[int, int]
    feature_mode: str
    bicubic_style: str = L.BICUBIC_STYLE
    validation: bool = True  # the data set has a val split


def prebuild(teacher: keras.Model, teacher_path: str, uses: Sequence[CacheUse], log=print) -> int:
    """Builds every cache the runs of ``uses`` will read that does not fit yet, running the
    teacher once over each set of sources instead of once per run's cache.

    A protocol's students of factors x2, x4 and x8 read one teacher's outputs on the same HR
    tiles, resized to three map sizes; built run by run, the teacher ran three times over the
    labeled and unlabeled tiles (about 3.5 min each on LC25000, 2 cores). The caches are exactly
    those the runs would have built; the runs then find them fitting.

    Returns:
      How many caches were built (training and validation caches each count).
    """
    # Runs that share a cache folder (one factor's students, each drawing its own share of the
    # unlabeled pool) need it to cover all their sources together.
    wanted: dict[str, tuple[CacheUse, bool, list]] = {}
    for u in uses:
        if u.data.augment not in CACHEABLE_AUGMENT:
            raise ValueError(
                f"a teacher cache holds the {CACHEABLE_AUGMENT} augmentations only, not "
                f"{u.data.augment!r}"
            )
        parts = [(u.cache_dir, u.data.augment == "flips", training_sources(u.data))]
        if u.validation:
            parts.append(
                (
                    os.path.join(u.cache_dir, VALIDATION_SUBDIR),
                    False,
                    [(os.path.abspath(u.data.data_dir), "val")],
                )
            )
        for cache_dir, all_eight, splits in parts:
            first, _, need = wanted.setdefault(cache_dir, (u, all_eight, []))
            if (first.map_size, first.feature_mode, first.bicubic_style, first.data.hr_px) != (
                    u.map_size, u.feature_mode, u.bicubic_style, u.data.hr_px):  # fmt: skip
                raise ValueError(
                    f"{cache_dir}: runs that share this teacher cache need other views of it "
                    f"(map size, feature resize or HR size); give them separate caches"
                )
            need += [s for s in splits if s not in need]
    builds = [
        _needed_build(
            teacher_path,
            u.data,
            cache_dir,
            need,
            dihedral=all_eight,
            map_size=u.map_size,
            feature_mode=u.feature_mode,
            bicubic_style=u.bicubic_style,
        )
        for cache_dir, (u, all_eight, need) in wanted.items()
    ]
    todo = [b for b in builds if b is not None]
    if todo:
        _build(teacher, todo, log)
    return len(todo)
