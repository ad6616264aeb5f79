"""The paper's protocol on one converted data set: teacher, LR baselines, label-free students.

The runs come from :func:`kd_histo.protocol.plan.plan`.
``run_experiment(cfg)`` trains, evaluates and measures them in order; finished steps are skipped
on a rerun, so a killed experiment resumes where it stopped (an unfinished run resumes from its
last epoch through ``kd_histo.training.train``). The results table, plots and report are written by
:mod:`kd_histo.protocol.report` after every run, so a crash loses nothing that was finished.

Layout of ``out_dir``::

    experiment.json      the resolved ExperimentConfig
    dataset.json         the data set's description when the experiment started (a rerun on a
                         re-converted data set, e.g. another split, is refused)
    runs/s<seed>/<name>  run folders (config.json, model.keras, logs/, eval_<split>/)
    cost/                cost.json, cost.md (one measurement per input size)
    state.json           wall time of every finished step
    report/              results.{csv,md,json}, plots, report.md, metrics/, tensorboard/

Not here: flags (``kd_histo.cli.experiment``), tables and figures (``kd_histo.protocol.report``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from kd_histo import schema
from kd_histo.atomic import write_json
from kd_histo.protocol import bundle
from kd_histo.protocol.plan import (
    EXPERIMENT_JSON,
    STATE_JSON,
    ExperimentConfig,
    RunSpec,
    cascade_dir,
    eval_dir,
    has_cascade,
    plan,
    run_kind,
    teacher_of,
)
from kd_histo.training.config import RunConfig


def _finished(spec: RunSpec) -> bool:
    from kd_histo.training.run_record import RUN_JSON

    return os.path.isfile(os.path.join(spec.model_dir, RUN_JSON))


class _State:
    """Wall times of finished steps, kept in ``state.json`` (atomic writes)."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, STATE_JSON)
        self.data: dict[str, dict[str, float]] = {}
        if os.path.isfile(self.path):
            with open(self.path) as f:
                self.data = json.load(f)

    def record(self, key: str, step: str, seconds: float) -> None:
        self.data.setdefault(key, {})[step] = round(seconds, 2)
        write_json(self.path, self.data)


def _check_same_experiment(cfg: ExperimentConfig, folder: str = "") -> None:
    """A rerun in the same folder must be the same experiment (or a larger grid of it).

    ``folder`` (default ``cfg.out_dir``) holds the ``experiment.json`` and ``dataset.json`` to
    compare with: the experiment folder, or a results bundle about to be imported.
    """
    folder = folder or cfg.out_dir
    path = os.path.join(folder, EXPERIMENT_JSON)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        before = json.load(f)
    now = json.loads(json.dumps(cfg.to_dict()))
    grid = {
        "factors",
        "unlabeled_fractions",
        "seeds",
        "baselines",
        "title",
        "cost_batch_sizes",
        "cost_repeats",
        "cascade_fractions",
        "n_boot",
    }
    not_compared = grid | {"base", "out_dir", "results_dir"}  # where things lie, not what they are
    base_now, base_before = dict(now["base"]), _base_as_now(before.get("base", {}))
    for d in (base_now, base_before):
        d.pop("verbose", None)
    # Settings added after an experiment started are absent from its experiment.json: they had
    # their defaults then.
    defaults = json.loads(
        json.dumps(
            {
                f.name: f.default
                for f in dataclasses.fields(ExperimentConfig)
                if f.default is not dataclasses.MISSING
            }
        )
    )
    differ = sorted(
        k for k in now if k not in not_compared and before.get(k, defaults.get(k)) != now[k]
    )
    differ += sorted(f"base.{k}" for k in base_now if base_before.get(k) != base_now[k])
    if differ:
        raise ValueError(
            f"{folder} holds an experiment with other settings ({', '.join(differ)}); "
            "rerun with the same flags to resume, or choose a new --out_dir"
            + (" (or another --results_dir)" if folder != cfg.out_dir else "")
        )
    started_on = os.path.join(folder, schema.DATASET_JSON)
    if os.path.isfile(started_on) and _data_identity(started_on) != _data_identity(
        os.path.join(cfg.base.data.data_dir, schema.DATASET_JSON)
    ):
        where = (
            f"changed since the experiment in {folder} started"
            if folder == cfg.out_dir
            else f"is not the data set the experiment in {folder} ran on"
        )
        raise ValueError(
            f"{cfg.base.data.data_dir} {where} (re-converted: other split, grouping or tiles); its "
            "finished runs would be mixed with the new data: choose a new --out_dir"
            + (" (or another --results_dir)" if folder != cfg.out_dir else "")
        )


def _base_as_now(base: dict) -> dict:
    """A base RunConfig as written before, as this version writes it: settings added since (a
    new field of a nested config, e.g. ``distill.ensemble_features``) read as their defaults,
    which is what they were then. Unreadable as a RunConfig: compared as it is."""
    try:
        return json.loads(json.dumps(RunConfig.from_dict(base).to_dict()))
    except (TypeError, ValueError, KeyError):
        return dict(base)


def _data_identity(path: str) -> dict:
    """What makes a data set the same for an experiment: dataset.json less its command line."""
    with open(path) as f:
        d = json.load(f)
    d.pop("command", None)
    return d


def _check_borrowed_teachers(cfg: ExperimentConfig, specs: list[RunSpec]) -> None:
    """Teachers from ``cfg.teachers_from`` must be trained, with this experiment's teacher config.

    Compared: the resolved RunConfig in the teacher's ``config.json`` against the planned one, less
    the run folder's spelling and the verbosity.
    """
    from kd_histo.training.config import RunConfig
    from kd_histo.training.run_record import CONFIG_JSON, read_run_record

    if not cfg.teachers_from:
        return

    def comparable(run: RunConfig) -> dict:
        d = run.to_dict()
        d.pop("model_dir", None)
        d.pop("verbose", None)
        return json.loads(json.dumps(d))

    for spec in (teacher_of(specs, seed) for seed in cfg.seeds):
        if not _finished(spec):
            raise ValueError(
                f"--teachers_from: {spec.model_dir} holds no trained teacher for seed {spec.seed}; "
                f"run the experiment in {cfg.teachers_from} with that seed first"
            )
        pending = [s for s in specs if s.seed == spec.seed and s is not spec and not _finished(s)]
        if pending and not os.path.isfile(
            read_run_record(spec.model_dir).model_path(spec.model_dir)
        ):
            raise ValueError(
                f"--teachers_from: the teacher in {spec.model_dir} has its record but not its "
                "weights "
                f"(imported from a results folder), and seed {spec.seed} still has runs to train "
                "here; "
                "drop --teachers_from to train the teacher here (the same seed retrains it, though "
                "not always to the bit)"
            )
        with open(os.path.join(spec.model_dir, CONFIG_JSON)) as f:
            trained = RunConfig.from_dict(json.load(f))
        a, b = comparable(trained), comparable(spec.config)
        differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        if differ:
            raise ValueError(
                f"--teachers_from: the teacher in {spec.model_dir} was trained with other settings "
                f"({', '.join(differ)}) than this experiment's teacher; drop --teachers_from to "
                "train one here"
            )


def run_experiment(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> dict[str, str]:
    """Runs the whole protocol (resuming a previous attempt) and writes the report.

    Args:
      cfg: the experiment.
      log: receives one line per step (the binary prints them).

    Returns:
      Paths of the report files (see :func:`kd_histo.protocol.report.write_report`).
    """
    from kd_histo.evaluation import cost
    from kd_histo.protocol import report

    specs = _start(cfg, log)
    state = _State(cfg.out_dir)
    start = time.perf_counter()
    prebuilt: set[int] = set()
    for i, spec in enumerate(specs, 1):
        prefix = f"[{i}/{len(specs)}] s{spec.seed}/{spec.name}"
        _train(specs, spec, state, prebuilt, prefix, log)
        acc = _evaluate(cfg, spec, state)
        log(
            f"{prefix}: {cfg.eval_split} accuracy {acc:.4f} ({time.perf_counter() - start:.0f} s "
            "so far)"
        )
        _cascade(cfg, specs, spec, state, prefix, log)
        tables = report.write_tables(
            cfg, specs[:i], state.data, costs=None
        )  # partial results survive a crash
        last_of_seed = i == len(specs) or specs[i].seed != spec.seed
        if cfg.results_dir and last_of_seed:
            _export(cfg, specs, tables, log)
    log("cost: FLOPs, parameters and latency per input size")
    costs = measure_costs(cfg, specs, cost, log)
    paths = report.write_report(cfg, specs, state.data, costs, wall_s=time.perf_counter() - start)
    if cfg.results_dir:
        _export(cfg, specs, paths, log)
    log(f"report: {paths['report']}")
    return paths


def _start(cfg: ExperimentConfig, log: Callable[[str], None]) -> list[RunSpec]:
    """The plan, once the folder is checked to hold this experiment (and the results folder's
    bundle too); records the experiment and the data set it starts on, imports the results
    folder's finished seeds, then checks the borrowed teachers against what is left to train."""
    specs = plan(cfg)
    _check_same_experiment(cfg)
    if cfg.results_dir:
        _check_same_experiment(cfg, os.path.join(cfg.results_dir, bundle.BUNDLE_DIR))
    # Every factor must fit the tile before anything trains (it failed after teacher and baseline)
    from kd_histo.training import preflight  # TensorFlow: only once the experiment runs

    preflight.check_input_sizes([s.config for s in specs if not _finished(s)])
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, EXPERIMENT_JSON), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)
    started_on = os.path.join(cfg.out_dir, schema.DATASET_JSON)
    if not os.path.isfile(started_on):
        shutil.copyfile(os.path.join(cfg.base.data.data_dir, schema.DATASET_JSON), started_on)
    if cfg.results_dir:
        bundle.import_seeds(cfg, specs, cfg.results_dir, log=log)
    # After the import: a seed whose runs all came from the results folder needs only its
    # borrowed teacher's record (a fresh checkout reruns the tables without the weights).
    _check_borrowed_teachers(cfg, specs)
    return specs


def _train(
    specs: list[RunSpec],
    spec: RunSpec,
    state: _State,
    prebuilt: set[int],
    prefix: str,
    log: Callable[[str], None],
) -> None:
    """Trains ``spec`` unless it is trained already; before a seed's first student, builds the
    teacher caches of all of its students."""
    import keras

    from kd_histo.training import train

    if _finished(spec):
        log(f"{prefix}: trained already, skipped")
        return
    view = "HR" if run_kind(spec.kind).view == "hr" else f"LR x{spec.factor:g}"
    log(f"{prefix}: training ({spec.config.mode}, input {view}, {spec.config.epochs} epochs)")
    if spec.config.mode == "distill" and spec.seed not in prebuilt:
        # One teacher pass for all of the seed's student caches (x2, x4, x8), not one per
        # factor; its time is the teacher's (state "teacher_cache_s"), not this student's.
        prebuilt.add(spec.seed)
        t0 = time.perf_counter()
        todo = [s.config for s in specs if s.seed == spec.seed and not _finished(s)]
        if train.prebuild_teacher_caches(todo, log=log):
            state.record(f"s{spec.seed}/teacher", "teacher_cache_s", time.perf_counter() - t0)
            keras.backend.clear_session()
    t0 = time.perf_counter()
    result = train.train(spec.config)
    if result.diverged_at_epoch is not None:
        log(
            f"{prefix}: the training diverged in epoch {result.diverged_at_epoch} (NaN/inf loss "
            "or val metrics); the best network before it is kept"
        )
    state.record(f"s{spec.seed}/{spec.name}", "train_s", time.perf_counter() - t0)
    keras.backend.clear_session()


def _evaluate(cfg: ExperimentConfig, spec: RunSpec, state: _State) -> float:
    """Evaluates ``spec`` on the experiment's split unless its metrics.json is there; returns its
    tile accuracy."""
    import keras

    from kd_histo.evaluation import evaluate

    out = eval_dir(spec, cfg.eval_split)
    if not os.path.isfile(os.path.join(out, evaluate.METRICS_JSON)):
        t0 = time.perf_counter()
        evaluate.evaluate_run(
            evaluate.EvalConfig(
                spec.model_dir, cfg.eval_split, out_dir=out, n_boot=cfg.n_boot, seed=spec.seed
            )
        )
        state.record(f"s{spec.seed}/{spec.name}", "eval_s", time.perf_counter() - t0)
        keras.backend.clear_session()
    with open(os.path.join(out, evaluate.METRICS_JSON)) as f:
        return json.load(f)["tile"]["accuracy"]


def _cascade(
    cfg: ExperimentConfig,
    specs: list[RunSpec],
    spec: RunSpec,
    state: _State,
    prefix: str,
    log: Callable[[str], None],
) -> None:
    """Measures ``spec``'s cascade with its seed's teacher where planned and not yet measured."""
    import keras

    from kd_histo.evaluation import evaluate

    out = cascade_dir(spec, cfg.eval_split)
    if not has_cascade(cfg, spec) or os.path.isfile(os.path.join(out, evaluate.CASCADE_JSON)):
        return
    t0 = time.perf_counter()
    evaluate.evaluate_run(
        evaluate.EvalConfig(
            spec.model_dir,
            cfg.eval_split,
            out_dir=out,
            n_boot=cfg.n_boot,
            seed=spec.seed,
            cascade_teacher=teacher_of(specs, spec.seed).model_dir,
            cascade_fractions=cfg.cascade_fractions,
        )
    )
    state.record(f"s{spec.seed}/{spec.name}", "cascade_s", time.perf_counter() - t0)
    keras.backend.clear_session()
    log(f"{prefix}: cascade with the teacher measured at shares {list(cfg.cascade_fractions)}")


def _export(cfg: ExperimentConfig, specs: list[RunSpec], paths: dict[str, str], log) -> None:
    """The complete seeds' bundle and copies of the report's files in ``cfg.results_dir``."""
    seeds = bundle.export_seeds(cfg, specs, cfg.results_dir)
    for path in paths.values():
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(cfg.results_dir, os.path.basename(path)))
    if seeds:
        log(f"results: seeds {seeds} exported to {cfg.results_dir} (commit it to resume elsewhere)")


def measure_costs(
    cfg: ExperimentConfig, specs: list[RunSpec], cost_module, log: Callable[[str], None] = print
) -> dict[float, dict[str, Any]] | None:
    """Cost of one network per input size (nets of one size share the architecture).

    Returns:
      {input_px: cost row} with ``gflops``, ``params``, ``timings``, ``flops_ratio_to_ref`` and
      ``speedup`` (images/s relative to the teacher at the largest batch size); None when some
      input size has neither a net with weights here nor a config to build one from.
    """
    import keras

    from kd_histo.models import load_model
    from kd_histo.training.run_record import read_run_record

    by_px: dict[int, RunSpec] = {}
    sizes: dict[int, RunSpec] = {}
    for spec in specs:
        record = read_run_record(spec.model_dir)
        sizes.setdefault(record.input_px, spec)
        # Runs imported from a results bundle have no weights: a net of that size that has is
        # measured.
        if os.path.isfile(record.model_path(spec.model_dir)):
            by_px.setdefault(record.input_px, spec)
    # Cost does not depend on the weights: a size with none here (every run of it imported from
    # --results_dir) is measured on its run's architecture built untrained.
    unbuilt = {px: s for px, s in sizes.items() if px not in by_px}
    if any(s.config.stain.method != "none" for s in unbuilt.values()):
        log(
            f"cost: not measured: no run of input size {sorted(unbuilt)} px has its weights in "
            f"{cfg.out_dir} (imported from --results_dir) and a stain-normalised net needs its "
            "reference to be built; the tables keep the cost columns empty"
        )
        return None
    teacher_px = read_run_record(teacher_of(specs, specs[0].seed).model_dir).input_px
    entries = []
    for px, spec in sorted({**by_px, **unbuilt}.items(), reverse=True):
        if px in unbuilt:
            model = _untrained(spec.config)
        else:
            model = load_model(read_run_record(spec.model_dir).model_path(spec.model_dir))
        entries.append(
            cost_module.model_cost(f"{px}px", model, px, cfg.cost_batch_sizes, cfg.cost_repeats)
        )
        keras.backend.clear_session()
    rows = cost_module.cost_table(entries, reference=f"{teacher_px}px")
    ref = next(r for r in rows if r["name"] == f"{teacher_px}px")
    for r in rows:
        r["speedup"] = r["timings"][-1]["images_per_s"] / ref["timings"][-1]["images_per_s"]
    cost_module.write_cost(rows, os.path.join(cfg.out_dir, "cost"))
    return {r["input_px"]: r for r in rows}


def _untrained(config) -> Any:
    """The run's network as its config builds it, untrained (cost only: the graph, not the
    weights, sets FLOPs and speed)."""
    from kd_histo.models import build_model
    from kd_histo.training.preflight import check_data

    info = check_data(config)
    return build_model(
        config.net.arch,
        info.num_classes,
        mean=info.mean,
        std=info.std,
        name=config.mode,
        **{**config.net.build_kwargs(), "weights": "none"},  # nothing downloaded or read
    )
