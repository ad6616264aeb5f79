"""A cohort predicted in streamed, resumable pieces, shared by job-array tasks (kd-histo-predict).

Each input (a slide file, a tile folder, a converted data folder) is one *unit*. When a unit
finishes, its per-slide files are in place (``<slide>.geojson``...) and its pieces go to
``<out_dir>/parts/``: ``<key>.tiles.csv`` (its rows of predictions.csv, no header),
``<key>.probs.npy`` and ``<key>.ood.npy`` (its tiles' probabilities and out-of-domain scores,
from which slides.csv is computed) and, written last, the marker ``<key>.done.json`` (its groups,
its skipped files, the per-slide files written). A unit without a marker is redone; one with a
marker is never redone. The cohort's tables are assembled from the parts in the order of the
inputs (:func:`assemble`), each atomically, so a run killed at any point and rerun, or one split
into tasks and merged, writes the same bytes.

``<out_dir>/cohort.json`` holds the fingerprint (the model's SHA-256 and the resolved prediction
settings: another model or other settings are refused), the inputs with their sizes and the
number of tasks, and what the tables' columns need (class names, cascade, OOD threshold), so that
``--merge`` needs nothing but the folder.

Locks (``kd_histo.evaluation.cohort_locks``: ``.lock-<name>`` files holding pid and host; a dead
writer's lock is taken over): one per task (a second predict of the same task into the folder is
refused), one per unit in ``parts/`` (two processes never work on one input), one for the tables.

Tasks (``--num_tasks``/``--task_index``): :func:`balanced_shares` gives each task its share of
the units, balanced by size on disk (largest first, each to the least loaded task).

Not here: reading inputs and running the models (``kd_histo.evaluation.predict``), the tables'
columns (``kd_histo.evaluation.prediction_files``).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from kd_histo.atomic import replacing, write_json
from kd_histo.evaluation import cohort_locks
from kd_histo.evaluation import prediction_files as files
from kd_histo.evaluation.prediction_files import ScoredGroup
from kd_histo.models import ood
from kd_histo.progress import progress

_LOG = logging.getLogger(__name__)

PARTS = "parts"
COHORT_JSON = "cohort.json"
TABLES = ("predictions.csv", "slides.csv", "skipped.csv")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One input: its path as given, its size on disk (bytes) and its name in ``parts/``."""

    path: str
    size: int
    key: str


@dataclasses.dataclass(frozen=True)
class Columns:
    """What the tables' columns depend on: the class names, a cascade, the OOD threshold."""

    names: tuple[str, ...]
    cascade: bool
    ood_threshold: float | None


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(settings: dict, **model_files: str) -> dict:
    """The settings, and the SHA-256 of each of ``model_files`` that exists (``<name>_sha256``)."""
    out = {"settings": settings}
    for name, path in model_files.items():
        if path and os.path.isfile(path):
            out[f"{name}_sha256"] = file_sha256(path)
    return out


def _size(path: str) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, names in os.walk(path) for f in names
    )


def unit_of(path: str) -> Unit:
    """The unit of an input: keyed by its name and a hash of its absolute path."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(os.path.normpath(path)))[:60]
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:10]
    return Unit(path, _size(path), f"{stem}-{digest}")


def balanced_shares(sizes: Sequence[int], num_tasks: int) -> list[int]:
    """The task of each unit: largest first (ties: the earlier input), each to the task with the
    least bytes so far (ties: the lower index). A pure function of the sizes and ``num_tasks``."""
    load = [0] * num_tasks
    task = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        t = min(range(num_tasks), key=lambda t: (load[t], t))
        task[i] = t
        load[t] += sizes[i]
    return task


def _lock(folder: str, name: str):
    return cohort_locks.held(folder, name)


def task_lock(out_dir: str, task_index: int, num_tasks: int):
    """The lock of one task (a plain predict is task 0 of 1)."""
    return _lock(out_dir, f"task-{task_index:05d}-of-{num_tasks:05d}")


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:
        raise ValueError(f"{path} is damaged (not JSON); delete it and rerun") from None


def open_cohort(
    out_dir: str, fingerprint: dict, columns: Columns, units: Sequence[Unit], num_tasks: int
) -> None:
    """Records the cohort in ``cohort.json``, or refuses an out_dir holding another model's or
    other settings' finished predictions (one line naming what differs)."""
    path = os.path.join(out_dir, COHORT_JSON)
    fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
    old = _read_json(path)
    if old is not None and old.get("fingerprint") != fingerprint and _any_done(out_dir):
        before = old.get("fingerprint") or {}
        keys = {**before.get("settings", {}), **fingerprint.get("settings", {})}
        differ = [k for k in fingerprint if k != "settings" and before.get(k) != fingerprint[k]]
        differ += [
            k for k in keys if before.get("settings", {}).get(k) != fingerprint["settings"].get(k)
        ]
        raise ValueError(
            f"{out_dir} holds predictions of another model or other settings "
            f"({', '.join(sorted(differ)) or 'fingerprint'} differ, see {path}); choose another "
            f"--out_dir, or delete {out_dir} to start over"
        )
    record = {
        "fingerprint": fingerprint,
        "columns": dataclasses.asdict(columns),
        "num_tasks": num_tasks,
        "inputs": [[u.path, u.size, u.key] for u in units],
    }
    record = json.loads(json.dumps(record, sort_keys=True))
    if old != record:
        write_json(path, record)


def _any_done(out_dir: str) -> bool:
    """Whether any input is finished in ``out_dir`` (else nothing is there to keep consistent)."""
    with contextlib.suppress(FileNotFoundError), os.scandir(os.path.join(out_dir, PARTS)) as it:
        return any(e.name.endswith(".done.json") for e in it)
    return False


@dataclasses.dataclass(frozen=True)
class Share:
    """A task's place: the out_dir, and its index among the number of tasks (1 = all inputs)."""

    out_dir: str
    task_index: int = 0
    num_tasks: int = 1


def run_share(
    share: Share,
    units: Sequence[Unit],
    fingerprint: dict,
    columns: Columns,
    predict_unit: Callable[[Unit], tuple[list[ScoredGroup], list[tuple[str, str]], dict]],
) -> None:
    """Predicts the task's unfinished units, one at a time under its lock, each written when it
    finishes (:func:`write_part`); ``predict_unit`` returns a unit's (groups, skipped files,
    {name: per-slide file written})."""
    out_dir = share.out_dir
    os.makedirs(out_dir, exist_ok=True)
    with task_lock(out_dir, share.task_index, share.num_tasks):
        open_cohort(out_dir, fingerprint, columns, units, share.num_tasks)
        task = balanced_shares([u.size for u in units], share.num_tasks)
        mine = [u for u, t in zip(units, task) if t == share.task_index]
        todo = [u for u in mine if not is_done(out_dir, u)]
        if len(todo) < len(mine):
            _LOG.info(
                f"{len(mine) - len(todo)} of {len(mine)} inputs already predicted in {out_dir}: "
                f"skipped (delete {os.path.join(out_dir, PARTS)} to redo them)"
            )
        parts = os.path.join(out_dir, PARTS)
        stale = stale_temps(out_dir, parts, os.path.join(out_dir, "heatmaps")) if todo else {}
        for u in progress(todo, desc="inputs", unit="inputs", show=len(todo) > 1):
            with unit_lock(out_dir, u):
                if not is_done(out_dir, u):  # another writer may have finished it meanwhile
                    write_part(out_dir, u, *predict_unit(u), columns, stale)


def _part(out_dir: str, unit: Unit, what: str) -> str:
    return os.path.join(out_dir, PARTS, f"{unit.key}.{what}")


def is_done(out_dir: str, unit: Unit) -> bool:
    return os.path.isfile(_part(out_dir, unit, "done.json"))


@contextlib.contextmanager
def unit_lock(out_dir: str, unit: Unit) -> Iterator[None]:
    os.makedirs(os.path.join(out_dir, PARTS), exist_ok=True)
    with _lock(os.path.join(out_dir, PARTS), unit.key):
        yield


def stale_temps(*folders: str) -> dict[str, list[str]]:
    """{final path: [its ``.tmp-<pid>`` files]} in ``folders`` as they are now: what killed
    writers left (remove a file's only while holding its lock). One listing per folder: no
    per-file pattern (``glob`` caches every pattern it compiles)."""
    out: dict[str, list[str]] = {}
    for folder in folders:
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(folder):
                final, tmp, _ = name.rpartition(".tmp-")
                if tmp:
                    out.setdefault(os.path.join(folder, final), []).append(
                        os.path.join(folder, name)
                    )
    return out


def remove_stale_temps(paths: Sequence[str], stale: dict[str, list[str]]) -> None:
    """Removes the temporary files of ``paths`` listed in ``stale`` (:func:`stale_temps`)."""
    for p in paths:
        for tmp in stale.get(p, ()):
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)


def write_part(
    out_dir: str,
    unit: Unit,
    groups: Sequence[ScoredGroup],
    skipped: Sequence[tuple[str, str]],
    paths: dict[str, str],
    columns: Columns,
    stale: dict[str, list[str]] | None = None,
) -> None:
    """A finished unit's pieces, then its marker (module docstring), each atomically; then the
    ``stale`` temporary files (:func:`stale_temps`) of its files are removed."""
    tiles, probs, scores = (_part(out_dir, unit, w) for w in ("tiles.csv", "probs.npy", "ood.npy"))
    with replacing(tiles) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(
            files.tile_rows(groups, columns.names, columns.cascade, columns.ood_threshold)
        )
    n = sum(len(g.probs) for g in groups)
    all_probs = [np.asarray(g.probs) for g in groups] or [np.zeros((0, len(columns.names)))]
    _save(probs, np.concatenate(all_probs))
    nan = np.full(n, np.nan, np.float32)
    all_scores = [nan[: len(g.probs)] if g.ood_scores is None else g.ood_scores for g in groups]
    _save(scores, np.concatenate(all_scores).astype(np.float32) if groups else nan)
    marker = {
        "input": unit.path,
        "groups": [
            {"slide_id": g.slide_id, "n": len(g.probs), "ood": g.ood_scores is not None}
            for g in groups
        ],
        "skipped": [list(s) for s in skipped],
        "paths": {k: os.path.relpath(v, out_dir) for k, v in paths.items()},  # movable
    }
    write_json(_part(out_dir, unit, "done.json"), marker)
    done = _part(out_dir, unit, "done.json")
    remove_stale_temps([tiles, probs, scores, done, *paths.values()], stale or {})


def _save(path: str, array: np.ndarray) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _check_done(out_dir: str, units: Sequence[Unit], num_tasks: int) -> None:
    """One line naming the unfinished units and their tasks, if any."""
    missing = [i for i, u in enumerate(units) if not is_done(out_dir, u)]
    if not missing:
        return
    task = balanced_shares([u.size for u in units], num_tasks)
    by_task: dict[int, list[str]] = {}
    for i in missing:
        by_task.setdefault(task[i], []).append(os.path.basename(units[i].path))
    said = "; ".join(
        f"task {t} of {num_tasks}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
        for t, names in sorted(by_task.items())
    )
    raise ValueError(
        f"{len(missing)} of {len(units)} inputs are not predicted yet in {out_dir} ({said}); "
        f"run those tasks (the same command with --task_index=I --num_tasks={num_tasks}), "
        "then --merge again"
    )


def _markers(out_dir: str, units: Sequence[Unit]) -> Iterator[dict]:
    """The units' markers, read one at a time (memory stays flat in the number of units)."""
    for u in units:
        yield _read_json(_part(out_dir, u, "done.json"))


def assemble(
    out_dir: str, units: Sequence[Unit], columns: Columns, warn_fraction: float, num_tasks: int = 1
) -> dict[str, str]:
    """The cohort's tables from the units' parts, in the order of ``units``; {name: path} of the
    tables and of every unit's per-slide files."""
    _check_done(out_dir, units, num_tasks)
    out = {}
    with _lock(out_dir, "tables"):
        remove_stale_temps([os.path.join(out_dir, t) for t in TABLES], stale_temps(out_dir))
        skipped, n_tiles = [], 0
        for m in _markers(out_dir, units):
            skipped += [tuple(s) for s in m["skipped"]]
            n_tiles += sum(g["n"] for g in m["groups"])
        skipped_csv = os.path.join(out_dir, "skipped.csv")
        if skipped:  # as conversion does: skip unreadable images, list them with the reason
            out["skipped"] = files.write_skipped(skipped, skipped_csv)
            _LOG.warning(
                f"skipped {len(skipped)} unreadable image(s), listed in {skipped_csv} "
                f"(first: {skipped[0][0]}: {skipped[0][1]})"
            )
        elif os.path.exists(skipped_csv):
            os.remove(skipped_csv)  # an earlier run's: nothing is skipped now
        if not n_tiles:
            first = f": {skipped[0][1]}" if skipped else ""
            raise ValueError(
                f"no readable tile in {', '.join(u.path for u in units)}{first}; see "
                f"{skipped_csv if skipped else 'the inputs'}"
            )
        out["predictions"] = _write_tiles(out_dir, units, columns)
        out["slides"], shares = _write_slides(out_dir, units, columns)
    if columns.ood_threshold is not None:
        for line in ood.warning_lines(shares, warn_fraction):
            _LOG.warning(line)
    for m in _markers(out_dir, units):
        out |= {k: os.path.join(out_dir, v) for k, v in m["paths"].items()}
    return out


def _write_tiles(out_dir: str, units: Sequence[Unit], columns: Columns) -> str:
    path = os.path.join(out_dir, "predictions.csv")
    header = files.tile_header(columns.names, columns.cascade, columns.ood_threshold)
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerow(header)
        for u in units:
            with open(_part(out_dir, u, "tiles.csv"), newline="") as part:
                shutil.copyfileobj(part, f)
    return path


def _write_slides(
    out_dir: str, units: Sequence[Unit], columns: Columns
) -> tuple[str, dict[str, float]]:
    """slides.csv: one row per slide id, in order of first appearance; a slide id found in
    several units (or groups) is one row of all its tiles. Returns (path, flagged shares)."""
    where: dict[str, list[tuple[int, int, int, bool]]] = {}  # id: (unit, start, end, scored)
    for i, m in enumerate(_markers(out_dir, units)):
        start = 0
        for g in m["groups"]:
            where.setdefault(g["slide_id"], []).append((i, start, start + g["n"], g["ood"]))
            start += g["n"]
    threshold, shares = columns.ood_threshold, {}
    path = os.path.join(out_dir, "slides.csv")
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(files.slide_header(columns.names, threshold is not None))
        for sid, pieces in where.items():
            probs = np.concatenate(
                [_load(out_dir, units[i], "probs")[a:b] for i, a, b, _ in pieces]
            )
            share: float | None | bool = False
            if threshold is not None:
                scored = [_load(out_dir, units[i], "ood")[a:b] for i, a, b, s in pieces if s]
                share = ood.flagged_fraction(np.concatenate(scored) > threshold) if scored else None
                if share is not None:
                    shares[sid] = share
            if len(probs):
                w.writerow(files.slide_row(sid, probs, columns.names, share))
    return path, shares


def _load(out_dir: str, unit: Unit, what: str) -> np.ndarray:
    return np.load(_part(out_dir, unit, f"{what}.npy"), mmap_mode="r", allow_pickle=False)


def merge(out_dir: str) -> dict[str, str]:
    """The cohort's tables from the parts the tasks wrote (``--merge``): every input must be done
    (one line naming the tasks that are not)."""
    record = _read_json(os.path.join(out_dir, COHORT_JSON))
    if record is None:
        raise ValueError(
            f"{out_dir} holds no {COHORT_JSON}: run the tasks of kd-histo-predict "
            "(--task_index=I --num_tasks=N) into it first"
        )
    units = [Unit(*entry) for entry in record["inputs"]]
    c = record["columns"]
    columns = Columns(tuple(c["names"]), c["cascade"], c["ood_threshold"])
    warn = record["fingerprint"]["settings"].get("ood_warn_fraction", ood.WARN_FRACTION)
    return assemble(out_dir, units, columns, warn, record["num_tasks"])
