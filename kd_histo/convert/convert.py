"""Runs a conversion: tasks write part files in parallel, a merge writes shards and dataset.json.

``convert(cfg)`` is the whole job on one machine. For many machines, each runs
``run_task(cfg)`` with its own ``task_index`` (units are split between tasks by slide), then one
runs ``merge(cfg)``. Parts live in ``<out_dir>/.parts``; a finished unit is never redone, so a
rerun after a crash resumes, and the merge is deterministic, so the shards come out identical.

This module does not read images itself (``convert.records`` does, in workers) and defines no flags.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import multiprocessing
import os
import shutil
import sys
import time

from kd_histo import schema
from kd_histo.atomic import write_json
from kd_histo.convert import plan as plan_lib
from kd_histo.convert import records, regions, tissue, writer
from kd_histo.convert.config import ConvertConfig
from kd_histo.convert.errors import ConversionError
from kd_histo.convert.stats import PixelStats
from kd_histo.progress import progress

PARTS = ".parts"


def convert(cfg: ConvertConfig) -> schema.DatasetInfo:
    """Converts all inputs of ``cfg`` into shards + dataset.json (one machine, ``num_tasks=1``)."""
    if cfg.num_tasks != 1:
        raise ConversionError(
            "convert() runs everything; with --num_tasks>1 run each task, then --merge"
        )
    os.makedirs(cfg.out_dir, exist_ok=True)
    # One lock over both phases: the task and merge locks alone would let a second run start its
    # task while this one merges (and deletes the parts under it).
    with writer.DirLock(cfg.out_dir, "convert"):
        run_task(cfg)
        return merge(cfg)


def _prepare(cfg: ConvertConfig) -> str:
    """Checks the output folder and returns the parts folder (created, fingerprinted)."""
    if cfg.num_tasks < 1 or not 0 <= cfg.task_index < cfg.num_tasks:
        raise ConversionError(
            f"need 0 <= --task_index < --num_tasks, got {cfg.task_index} and {cfg.num_tasks}"
        )
    if cfg.encode.image_format not in ("png", "jpeg"):
        raise ConversionError(f"image_format must be png or jpeg, got {cfg.encode.image_format!r}")
    if not 1 <= cfg.encode.jpeg_quality <= 100 or not 0 <= cfg.encode.png_level <= 9:
        raise ConversionError(
            f"need 1 <= jpeg_quality <= 100 and 0 <= png_level <= 9, "
            f"got {cfg.encode.jpeg_quality} and {cfg.encode.png_level}"
        )
    if cfg.encode.tile_px < 8:
        raise ConversionError(f"tile_px must be >= 8, got {cfg.encode.tile_px}")
    if cfg.encode.lr_factor and cfg.encode.tile_px % cfg.encode.lr_factor:
        raise ConversionError(
            f"tile_px={cfg.encode.tile_px} is not divisible by lr_factor={cfg.encode.lr_factor}"
        )
    if cfg.encode.tissue_method not in tissue.TISSUE_METHODS or cfg.encode.min_tissue_area < 0:
        raise ConversionError(
            f"need --tissue_method in {', '.join(tissue.TISSUE_METHODS)} and "
            f"--min_tissue_area >= 0, got {cfg.encode.tissue_method!r} and "
            f"{cfg.encode.min_tissue_area:g}"
        )
    if cfg.compression not in ("", "GZIP"):
        raise ConversionError(f"compression must be '' or GZIP, got {cfg.compression!r}")
    parts = os.path.join(cfg.out_dir, PARTS)
    if os.path.exists(os.path.join(cfg.out_dir, schema.DATASET_JSON)) and not os.path.isdir(parts):
        if not cfg.overwrite:
            raise ConversionError(
                f"{cfg.out_dir} already holds a data set; "
                "pass --overwrite or choose another --out_dir"
            )
        _clear(cfg.out_dir)
    os.makedirs(parts, exist_ok=True)
    fp_path = os.path.join(parts, "config.json")
    fp = json.loads(json.dumps(cfg.fingerprint()))
    if cfg.annotations:  # edited annotation files change the labels: no resume across them
        fp["annotations_sha256"] = regions.spec_digest(cfg.annotations)
    if os.path.exists(fp_path):
        with open(fp_path) as f:
            old = json.load(f)
        if old != fp:
            if not cfg.overwrite:
                changed = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
                raise ConversionError(
                    f"{cfg.out_dir} holds parts of a conversion with other settings "
                    f"({', '.join(changed)}); "
                    "pass --overwrite or choose another --out_dir"
                )
            _clear(cfg.out_dir)
            os.makedirs(parts, exist_ok=True)
    write_json(fp_path, fp)
    return parts


def _clear(out_dir: str) -> None:
    shutil.rmtree(os.path.join(out_dir, PARTS), ignore_errors=True)
    for name in os.listdir(out_dir):
        if _is_shard(name) or name == schema.DATASET_JSON:
            os.remove(os.path.join(out_dir, name))


def _is_shard(name: str) -> bool:
    try:
        schema.parse_shard_name(name)
    except schema.SchemaError:
        return False
    return True


def run_task(cfg: ConvertConfig) -> dict:
    """Plans, then writes the part files of this task's units (resuming finished ones)."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    with writer.DirLock(cfg.out_dir, f"task-{cfg.task_index:05d}"):
        fresh = not os.path.isdir(os.path.join(cfg.out_dir, PARTS))
        parts = _prepare(cfg)
        with _LazyPool(cfg.num_workers) as pool:
            try:
                plan = plan_lib.make_plan(cfg, pool.map_chunks)
            except BaseException:
                # A bad listing (missing file, path outside --root...) wrote no unit: leave no
                # parts folder, whose fingerprint would refuse the corrected rerun.
                if fresh:
                    shutil.rmtree(parts, ignore_errors=True)
                raise
            mine = [u for u in plan.units if plan_lib.unit_task(u) == cfg.task_index]
            summaries = _run_units(mine, cfg, parts, plan.class_names, pool)
        done = {
            "units": [s["unit_id"] for s in summaries],
            "class_names": plan.class_names,
            "skipped": plan.skipped,
            "notes": plan.notes,
            "num_inputs": plan.num_inputs,
            "has_slides": plan.has_slides,
            "has_tiles": plan.has_tiles,
            "annotations": plan.annotations,
            "all_units": [u.unit_id for u in plan.units],
        }
        write_json(
            os.path.join(parts, f"task-{cfg.task_index:05d}-of-{cfg.num_tasks:05d}.json"), done
        )
        return done


class _LazyPool:
    """Worker processes started only when there are at least two jobs to share between them.

    Workers are spawned, not forked (the parent has TensorFlow loaded, and forking a TF process is
    unsafe); a spawn costs seconds, which a small job (one slide unit) would only lose.
    """

    def __init__(self, num_workers: int):
        self.num_workers, self.executor = num_workers, None

    def get(self, jobs: int):
        """The executor, or None to run ``jobs`` jobs in this process."""
        if self.executor is None and self.num_workers > 0 and jobs > 1:
            ctx = multiprocessing.get_context("spawn")
            self.executor = cf.ProcessPoolExecutor(
                self.num_workers,
                mp_context=ctx,
                initializer=_die_with_parent,
                initargs=(os.getpid(),),
            )
        return self.executor

    def map_chunks(self, fn, items: list, chunk: int = 64) -> list:
        """``fn`` over chunks of ``items``, results concatenated in order."""
        chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
        ex = self.get(len(chunks))
        if ex is None:
            return [r for c in chunks for r in fn(c)]
        return [r for f in [ex.submit(fn, c) for c in chunks] for r in f.result()]

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc):
        if self.executor is not None:
            if kind is not None and issubclass(kind, KeyboardInterrupt):
                # Ctrl-C: stop now rather than wait for the running units (a unit is kept only
                # once whole, so the rerun redoes them).
                for proc in list((getattr(self.executor, "_processes", None) or {}).values()):
                    proc.terminate()
            self.executor.shutdown(cancel_futures=True)
        return False


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: the worker ends when the conversion does, even under ``kill -9``.

    A killed parent cannot shut its pool down; its workers (hundreds of MB each) would be
    reparented to PID 1 and run on. On Linux the kernel sends them SIGKILL when the parent dies
    (``prctl(PR_SET_PDEATHSIG)``); elsewhere a thread watches the parent id.
    """
    import signal
    import threading

    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    else:

        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)
    # Ctrl-C reaches the whole process group: the parent alone handles it (one line) and stops
    # the workers; each would print its own traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_units(units, cfg, parts, class_names, lazy: _LazyPool) -> list[dict]:
    total = sum(len(u.items) for u in units)
    bar = progress(total=total, desc="converting", unit="tiles", show=cfg.progress)
    args = (cfg.encode, parts, tuple(class_names))
    out = {}
    todo = [u for u in units if not os.path.exists(records.summary_path(parts, u.unit_id))]
    executor = lazy.get(len(todo))
    with bar:
        if executor is None:
            for u in units:
                out[u.unit_id] = records.process_unit(u, *args)
                bar.update(len(u.items))
        else:
            futures = {executor.submit(records.process_unit, u, *args): u for u in units}
            # a failure propagates; the pool's exit cancels the rest
            for f in cf.as_completed(futures):
                out[futures[f].unit_id] = f.result()
                bar.update(len(futures[f].items))
    return [out[u.unit_id] for u in units]


def merge(cfg: ConvertConfig) -> schema.DatasetInfo:
    """Writes balanced shards per split and dataset.json from all tasks' parts.

    Raises:
      ConversionError: a task has not finished (its summary file is missing).
    """
    parts = os.path.join(cfg.out_dir, PARTS)
    for t in range(cfg.num_tasks):
        if not os.path.exists(os.path.join(parts, f"task-{t:05d}-of-{cfg.num_tasks:05d}.json")):
            raise ConversionError(
                f"task {t} of {cfg.num_tasks} has not finished in {cfg.out_dir}; "
                f"run it with --task_index={t} --num_tasks={cfg.num_tasks}, then merge again"
            )
    with writer.DirLock(cfg.out_dir, "merge"):
        tasks = []
        for t in range(cfg.num_tasks):
            with open(os.path.join(parts, f"task-{t:05d}-of-{cfg.num_tasks:05d}.json")) as f:
                tasks.append(json.load(f))
        unit_ids = tasks[0]["all_units"]
        summaries = []
        for uid in unit_ids:
            with open(records.summary_path(parts, uid)) as f:
                summaries.append(json.load(f))
        info = _describe(cfg, tasks[0], summaries)
        by_split = collections.defaultdict(list)
        for s in summaries:
            by_split[s["split"]].append(s)
        for name in os.listdir(cfg.out_dir):
            # shards of an earlier, interrupted merge, and its half-written temporary files
            if _is_shard(name) or (".tmp-" in name and _is_shard(name.rsplit(".tmp-", 1)[0])):
                os.remove(os.path.join(cfg.out_dir, name))
        for split, ss in by_split.items():
            total = sum(s["count"] for s in ss)
            if total == 0:
                continue
            n_shards = cfg.num_shards or -(-total // cfg.examples_per_shard)
            paths = writer.write_shards(
                cfg.out_dir,
                split,
                [os.path.join(parts, f"{s['unit_id']}.tfrecord") for s in ss],
                total,
                n_shards,
                cfg.compression,
            )
            info.shards[split] = len(paths)
        info.write(cfg.out_dir)
        if not cfg.keep_parts:
            shutil.rmtree(parts, ignore_errors=True)
        return info


def _describe(cfg: ConvertConfig, task: dict, summaries: list[dict]) -> schema.DatasetInfo:
    counts: dict[str, dict[str, int]] = {}
    skipped = list(task["skipped"])
    notes = list(task["notes"])
    note_counts: collections.Counter = collections.Counter()
    stats, all_stats = PixelStats(), PixelStats()
    background = 0
    for s in summaries:
        split_counts = counts.setdefault(s["split"], {})
        for k, v in s["counts"].items():
            split_counts[k] = split_counts.get(k, 0) + v
        skipped += s["skipped"]
        note_counts.update(s["notes"])
        background += s["background"]
        part = PixelStats(**s["stats"])
        all_stats = all_stats.merge(part)
        if s["split"] == "train":
            stats = stats.merge(part)
    notes.append(
        f"{task['num_inputs']} inputs listed (files, slides, HDF5 patches), {len(skipped)} skipped"
    )
    notes += [f"{n} inputs: {note}" for note, n in sorted(note_counts.items())]
    if background:
        notes.append(
            f"{background} slide tiles dropped as background after reading "
            f"(tissue < {cfg.encode.min_tissue:g})"
        )
    if stats.count == 0:
        stats = all_stats
        notes.append("no train split: mean/std are over all converted tiles")
    mean, std = stats.mean_std() if stats.count else ([0.5] * 3, [0.25] * 3)
    mpp = cfg.encode.target_mpp if task["has_slides"] else cfg.encode.tile_mpp
    if task["has_slides"] and task["has_tiles"] and cfg.encode.tile_mpp != cfg.encode.target_mpp:
        notes.append(
            f"tiles ({cfg.encode.tile_mpp:g} µm/px) and slide tiles ({mpp:g} µm/px) are mixed; "
            "mpp is the slides'"
        )
    return schema.DatasetInfo(
        class_names=list(task["class_names"]),
        tile_px=cfg.encode.tile_px,
        mpp=float(mpp),
        counts=counts,
        shards={},
        mean=mean,
        std=std,
        compression=cfg.compression,
        image_format=cfg.encode.image_format,
        lr_factor=float(cfg.encode.lr_factor)
        if (cfg.encode.lr_factor and task["has_slides"])
        else 0.0,
        source=", ".join(
            x for x in (cfg.input_dir, cfg.manifest, cfg.slide_labels, *cfg.slides) if x
        ),
        command=cfg.command,
        skipped=skipped,
        notes=notes,
        annotations=list(task.get("annotations", [])),
    )
