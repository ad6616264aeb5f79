"""An experiment's finished seeds as a small folder to commit, and back.

A three-seed protocol outlives a session on a 2-core machine, and a fresh checkout has no
``runs/``. What the report needs of a finished run is small: its record (``run.json``,
``config.json``, ``history.csv``), its evaluation (``metrics.json`` and the per-tile predictions)
and its cascade summary. :func:`export_seeds` writes those of every *complete* seed (each planned
run trained and evaluated, cascades measured) into a results folder; the per-tile predictions of
all runs go into one wide table, ``tile_predictions.csv`` (one row per evaluated tile, one column
of predicted class indices per ``s<seed>/<run>``), instead of one ``predictions.csv`` per run.
:func:`import_seeds` writes them back into an experiment folder, so the runner skips those seeds
(their runs count as finished; no model is needed to report them) and the report pairs them with
the seeds trained now. Only whole seeds move: a half-finished seed needs its teacher's weights,
which are not exported.

Layout of the results folder's ``bundle/``::

    experiment.json, dataset.json   as in the experiment folder (checked on import)
    state.json                      the exported seeds' wall times
    runs/s<seed>/<run>/             run.json, config.json, history.csv,
                                    eval_<split>/metrics.json, cascade_<split>/cascade.{json,csv}
    tile_predictions.csv            source, slide_id, x, y, label, then one column per s<seed>/<run>
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Callable, Sequence

from kd_histo import schema
from kd_histo.atomic import write_json, write_text
from kd_histo.evaluation.evaluate import CASCADE_CSV, CASCADE_JSON, METRICS_JSON, PREDICTIONS_CSV
from kd_histo.protocol.plan import (
    EXPERIMENT_JSON,
    STATE_JSON,
    RunSpec,
    cascade_dir,
    eval_dir,
    has_cascade,
)
from kd_histo.protocol.rows import scored_tile

BUNDLE_DIR = "bundle"
PREDICTIONS = "tile_predictions.csv"
RUN_FILES = ("run.json", "config.json", "history.csv")
_TILE_COLUMNS = ("source", "slide_id", "x", "y", "label")


def _complete(cfg, spec: RunSpec) -> bool:
    out = eval_dir(spec, cfg.eval_split)
    done = all(os.path.isfile(os.path.join(spec.model_dir, f)) for f in RUN_FILES[:2]) and all(
        os.path.isfile(os.path.join(out, f)) for f in (METRICS_JSON, PREDICTIONS_CSV)
    )
    if done and has_cascade(cfg, spec):
        done = os.path.isfile(os.path.join(cascade_dir(spec, cfg.eval_split), CASCADE_JSON))
    return done


def complete_seeds(cfg, specs: Sequence[RunSpec]) -> list[int]:
    """Seeds whose every planned run is trained, evaluated and (where planned) cascaded."""
    return [s for s in cfg.seeds if all(_complete(cfg, p) for p in specs if p.seed == s)]


def _rel(cfg, path: str) -> str:
    return os.path.relpath(path, cfg.out_dir)


def _borrowed(cfg, spec: RunSpec) -> bool:
    """A teacher of ``teachers_from``: it belongs to the other experiment's results."""
    return not os.path.abspath(spec.model_dir).startswith(os.path.abspath(cfg.out_dir) + os.sep)


def export_seeds(cfg, specs: Sequence[RunSpec], results_dir: str) -> list[int]:
    """Writes the complete seeds' results into ``<results_dir>/bundle`` (replacing their files).

    Returns:
      The seeds exported.
    """
    seeds = complete_seeds(cfg, specs)
    if not seeds:
        return []
    bundle = os.path.join(results_dir, BUNDLE_DIR)
    os.makedirs(bundle, exist_ok=True)
    for name in (EXPERIMENT_JSON, schema.DATASET_JSON):
        shutil.copyfile(os.path.join(cfg.out_dir, name), os.path.join(bundle, name))
    with open(os.path.join(cfg.out_dir, STATE_JSON)) as f:
        state = json.load(f)
    write_json(
        os.path.join(bundle, STATE_JSON),
        {k: v for k, v in state.items() if int(k.split("/")[0][1:]) in seeds},
    )
    tiles: dict[tuple, dict[str, str]] = {}
    columns = []
    for spec in (p for p in specs if p.seed in seeds and not _borrowed(cfg, p)):
        dest = os.path.join(bundle, _rel(cfg, spec.model_dir))
        files = [os.path.join(spec.model_dir, f) for f in RUN_FILES]
        files.append(os.path.join(eval_dir(spec, cfg.eval_split), METRICS_JSON))
        if has_cascade(cfg, spec):
            files += [
                os.path.join(cascade_dir(spec, cfg.eval_split), f)
                for f in (CASCADE_JSON, CASCADE_CSV)
            ]
        for src in files:
            if os.path.isfile(src):
                out = os.path.join(dest, os.path.relpath(src, spec.model_dir))
                os.makedirs(os.path.dirname(out), exist_ok=True)
                shutil.copyfile(src, out)
        column = f"s{spec.seed}/{spec.name}"
        columns.append(column)
        with open(os.path.join(eval_dir(spec, cfg.eval_split), PREDICTIONS_CSV), newline="") as f:
            for row in csv.DictReader(f):
                key = tuple(row[c] for c in _TILE_COLUMNS)
                tiles.setdefault(key, {})[column] = row["pred"]
    lines = [",".join((*_TILE_COLUMNS, *columns))]
    w = csv.writer(_Lines(lines), lineterminator="")
    for key in sorted(tiles, key=lambda k: (k[0], int(k[2]), int(k[3]))):
        w.writerow([*key, *(tiles[key].get(c, "") for c in columns)])
    write_text(os.path.join(bundle, PREDICTIONS), "\n".join(lines) + "\n")
    return seeds


def _check_records(cfg, bundle: str, specs: Sequence[RunSpec]) -> None:
    """Refuses a bundle whose table names a run whose record files are absent."""
    for spec in specs:
        src = os.path.join(bundle, _rel(cfg, spec.model_dir))
        needed = [
            *RUN_FILES[:2],
            os.path.relpath(
                os.path.join(eval_dir(spec, cfg.eval_split), METRICS_JSON), spec.model_dir
            ),
        ]
        missing = [f for f in needed if not os.path.isfile(os.path.join(src, f))]
        if missing:
            raise ValueError(
                f"{bundle}: {PREDICTIONS} holds run s{spec.seed}/{spec.name} but "
                f"{os.path.join(src, missing[0])} is missing, so the seed cannot be imported; were "
                "the "
                f"bundle's files all committed (`git status --ignored {bundle}`)? Delete the "
                "bundle "
                f"to retrain its seeds"
            )


class _Lines:
    """csv.writer target that appends each written row to a list."""

    def __init__(self, lines: list[str]):
        self.lines = lines

    def write(self, text: str) -> None:
        self.lines.append(text)


def find(folder: str) -> str | None:
    """The bundle of ``folder``: a results folder (``<folder>/bundle``) or a bundle itself; None
    when neither holds a ``tile_predictions.csv``."""
    for candidate in (os.path.join(folder, BUNDLE_DIR), folder):
        if os.path.isfile(os.path.join(candidate, PREDICTIONS)):
            return candidate
    return None


def correct_by_seed(bundle: str, run: str, split: str) -> dict[int, dict[tuple, tuple[int, str]]]:
    """{seed: {(source, x, y): (correct, slide id)}} of one run's labeled tiles in a bundle, the
    form :func:`kd_histo.protocol.rows.read_correct_folder` gives for a run folder (each tile
    scored by :func:`kd_histo.protocol.rows.scored_tile`); {} when the bundle holds no seed of
    ``run``.

    Raises:
      ValueError: the bundle's runs were evaluated on another split than ``split``.
    """
    with open(os.path.join(bundle, EXPERIMENT_JSON)) as f:
        evaluated = json.load(f).get("eval_split", "test")
    if evaluated != split:
        raise ValueError(f"{bundle} holds evaluations on {evaluated!r} only, not {split!r}")
    out: dict[int, dict[tuple, tuple[int, str]]] = {}
    with open(os.path.join(bundle, PREDICTIONS), newline="") as f:
        reader = csv.DictReader(f)
        columns = {}
        for name in reader.fieldnames or ():
            seed, sep, rest = name.partition("/")
            if sep and rest == run and seed[:1] == "s" and seed[1:].isdigit():
                columns[int(seed[1:])] = name
        for row in reader:
            if int(row["label"]) < 0:
                continue
            for seed, name in columns.items():
                if row[name] != "":
                    key, score = scored_tile(row, row[name])
                    out.setdefault(seed, {})[key] = score
    return out


def import_seeds(
    cfg, specs: Sequence[RunSpec], results_dir: str, log: Callable[[str], None] = print
) -> list[int]:
    """Writes the bundle's seeds back into ``cfg.out_dir`` where their runs are absent.

    A seed is imported only when the bundle holds every planned run of it and the experiment
    folder holds none of its runs yet (a seed trained here is never overwritten). Call it after
    the bundle's ``experiment.json`` and ``dataset.json`` were checked against ``cfg``.

    Returns:
      The seeds imported.
    """
    bundle = os.path.join(results_dir, BUNDLE_DIR)
    table = os.path.join(bundle, PREDICTIONS)
    if not os.path.isfile(table):
        return []
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0]) - set(_TILE_COLUMNS) if rows else set()
    info = schema.DatasetInfo.read(os.path.join(bundle))
    state_path = os.path.join(cfg.out_dir, STATE_JSON)
    state = {}
    if os.path.isfile(state_path):
        with open(state_path) as f:
            state = json.load(f)
    with open(os.path.join(bundle, STATE_JSON)) as f:
        bundle_state = json.load(f)
    ready = {}
    for seed in cfg.seeds:
        own = [p for p in specs if p.seed == seed and not _borrowed(cfg, p)]
        if not own or not all(f"s{seed}/{p.name}" in columns for p in own):
            continue
        if any(os.path.exists(os.path.join(p.model_dir, "run.json")) for p in own):
            continue
        _check_records(cfg, bundle, own)
        ready[seed] = own
    imported = []
    for seed, own in ready.items():
        for spec in own:
            src = os.path.join(bundle, _rel(cfg, spec.model_dir))
            shutil.copytree(src, spec.model_dir, dirs_exist_ok=True)
            column = f"s{seed}/{spec.name}"
            out = [",".join((*_TILE_COLUMNS, "pred", "pred_name"))]
            w = csv.writer(_Lines(out), lineterminator="")
            for r in rows:
                if r[column] != "":
                    pred = int(r[column])
                    w.writerow([*(r[c] for c in _TILE_COLUMNS), pred, info.class_names[pred]])
            write_text(
                os.path.join(eval_dir(spec, cfg.eval_split), PREDICTIONS_CSV), "\n".join(out) + "\n"
            )
        state.update({k: v for k, v in bundle_state.items() if k.startswith(f"s{seed}/")})
        imported.append(seed)
        log(f"seed {seed}: {len(own)} finished runs imported from {bundle} (not retrained)")
    if imported:
        write_json(state_path, state)
    return imported
