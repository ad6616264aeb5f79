"""The report folder of an experiment: tables, figures, copies of each run's files, report.md.

``write_tables`` writes results.csv / results.md / results.json into ``<out_dir>/report``;
``write_report`` adds the figures (accuracy vs GFLOPs, accuracy vs unlabeled fraction, confusion
matrices), copies of every metrics.json and TensorBoard log folder, the cascade rows
(cascade.csv), and report.md. With several seeds the tables give mean ± sd per model and each
student's paired difference to the baseline of its factor, and the figures show the seeds' means
with their spread.

Not here: the rows (``kd_histo.protocol.rows``), the tables' text (``kd_histo.protocol.tables``),
the protocol's figures (``kd_histo.protocol.figures``), running anything
(``kd_histo.protocol.experiment``), metric formulas (``kd_histo.evaluation.metrics``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from kd_histo import schema
from kd_histo.atomic import write_text
from kd_histo.evaluation import plots
from kd_histo.models.keras_cv_backbone import is_keras_cv
from kd_histo.protocol import figures, plan, tables
from kd_histo.protocol.claims import claims_markdown, factor_claims
from kd_histo.protocol.plan import run_kind
from kd_histo.protocol.rows import (
    CASCADE_COLUMNS,
    cascade_rows,
    mean_rows,
    paired_table,
    read_correct,
    read_metrics,
    result_rows,
    seed_summary,
)

REPORT_DIR = "report"


def _collect(cfg, specs, state, costs):
    metrics = {
        f"s{s.seed}/{s.name}": m
        for s in specs
        if (m := read_metrics(s, cfg.eval_split)) is not None
    }
    return metrics, result_rows(specs, metrics, state, costs)


def write_tables(cfg, specs: Sequence, state: Mapping[str, dict], costs) -> dict[str, str]:
    """results.csv, results.md and results.json in ``<out_dir>/report``; returns their paths."""
    _, rows = _collect(cfg, specs, state, costs)
    return _write_tables(cfg, rows, _paired(cfg, specs))


def _write_tables(cfg, rows: Sequence[dict], prows: Sequence[dict]) -> dict[str, str]:
    out = os.path.join(cfg.out_dir, REPORT_DIR)
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f"results.{k}") for k in ("csv", "md", "json")}
    write_text(paths["csv"], tables.csv_text(rows))
    write_text(paths["md"], tables.results_markdown(rows, prows))
    write_text(
        paths["json"],
        json.dumps(
            {"rows": rows, "summary": seed_summary(rows) if rows else [], "paired": prows},
            indent=2,
        ),
    )
    return paths


def _paired(cfg, specs) -> list[dict[str, Any]]:
    correct = {
        f"s{s.seed}/{s.name}": c
        for s in specs
        if run_kind(s.kind).mode != "teacher" and (c := read_correct(s, cfg.eval_split)) is not None
    }
    return paired_table(specs, correct, n_boot=max(cfg.n_boot, 1000))


def write_report(
    cfg, specs: Sequence, state: Mapping[str, dict], costs, wall_s: float, command: str = ""
) -> dict[str, str]:
    """The report folder: tables, figures, metrics and TensorBoard copies, report.md.

    Returns:
      Paths: ``report`` (report.md), ``csv``, ``md``, ``json`` and the figures that were drawn.
    """
    metrics, rows = _collect(cfg, specs, state, costs)
    prows = _paired(cfg, specs)  # the bootstrap runs once, for the tables and report.md
    paths = _write_tables(cfg, rows, prows)
    out = os.path.join(cfg.out_dir, REPORT_DIR)
    info = schema.DatasetInfo.read(cfg.base.data.data_dir)
    paths.update(_draw_figures(cfg, rows, metrics, info.class_names, out))
    _copy_run_files(specs, metrics, out)
    crows = cascade_rows(specs, cfg.eval_split)
    if crows:
        paths["cascade_csv"] = os.path.join(out, "cascade.csv")
        write_text(paths["cascade_csv"], tables.csv_text(crows, CASCADE_COLUMNS))
    paths["report"] = os.path.join(out, "report.md")
    write_text(
        paths["report"],
        report_markdown(cfg, rows, info, wall_s, paths, command, prows, cascade=crows),
    )
    return paths


def _draw_figures(
    cfg, rows: Sequence[dict], metrics: Mapping[str, dict], class_names, out: str
) -> dict[str, str]:
    """Accuracy vs compute, vs the unlabeled fraction (when some run had extra data) and the first
    seed's confusion matrices; returns {figure: path}."""
    first_seed = min(r["seed"] for r in rows)
    shown = [r for r in rows if r["seed"] == first_seed]
    several = len({r["seed"] for r in rows}) > 1
    # Several seeds: the seeds' means, bars = ± sd, and every seed as a small dot.
    plotted, dots = (mean_rows(rows), rows) if several else (shown, None)
    paths = {
        "accuracy_vs_gflops": figures.accuracy_vs_gflops_png(
            plotted,
            os.path.join(out, "accuracy_vs_gflops.png"),
            f"{cfg.title}: accuracy vs compute",
            seed_rows=dots,
        )
    }
    if any(r["unlabeled_fraction"] > 0 for r in rows):
        paths["accuracy_vs_unlabeled"] = figures.accuracy_vs_unlabeled_png(
            plotted,
            os.path.join(out, "accuracy_vs_unlabeled.png"),
            f"{cfg.title}: more unlabeled data",
            seed_rows=dots,
        )
    cms = [
        (r["run"], metrics[f"s{first_seed}/{r['run']}"]["tile"]["confusion_matrix"]) for r in shown
    ]
    paths["confusion_matrices"] = plots.confusion_grid_png(
        cms, class_names, os.path.join(out, "confusion_matrices.png")
    )
    return paths


def _copy_run_files(specs: Sequence, metrics: Mapping[str, dict], out: str) -> None:
    """Copies of each run's metrics.json and TensorBoard logs, so the report folder stands
    alone."""
    for s in specs:
        key = f"s{s.seed}/{s.name}"
        if key in metrics:
            os.makedirs(os.path.join(out, "metrics"), exist_ok=True)
            write_text(
                os.path.join(out, "metrics", f"s{s.seed}_{s.name}.json"),
                json.dumps(metrics[key], indent=2),
            )
        logs = os.path.join(s.model_dir, "logs")
        if os.path.isdir(logs):
            shutil.copytree(
                logs, os.path.join(out, "tensorboard", f"s{s.seed}", s.name), dirs_exist_ok=True
            )


def report_markdown(
    cfg,
    rows: Sequence[dict],
    info: schema.DatasetInfo,
    wall_s: float,
    paths: Mapping[str, str],
    command: str = "",
    prows: Sequence[dict] = (),
    cascade: Sequence[dict] = (),
) -> str:
    """report.md: what was run on what, the table, the paired differences, the figures."""
    lines = [f"# {cfg.title}", "", *_setup_paragraphs(cfg, info, wall_s)]
    lines += _table_sections(cfg, rows, prows, cascade)
    for key, caption in (
        ("accuracy_vs_gflops", "Accuracy vs compute"),
        ("accuracy_vs_unlabeled", "More unlabeled data"),
        ("confusion_matrices", "Confusion matrices"),
    ):
        if key in paths:
            lines += [f"![{caption}]({os.path.basename(paths[key])})", ""]
    lines += [
        "Files: `results.csv` / `results.json` (every number above), `metrics/` (each run's full "
        "evaluation: per-class metrics, slide level, intervals), `tensorboard/` "
        f"(`tensorboard --logdir {os.path.join(cfg.out_dir, REPORT_DIR, 'tensorboard')}`).",
        "",
    ]
    if command:
        lines += ["Reproduce with:", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def _setup_paragraphs(cfg, info: schema.DatasetInfo, wall_s: float) -> list[str]:
    """report.md's opening: the data, every net's settings, how it was evaluated."""
    b = cfg.base
    counts = ", ".join(
        f"{s} {info.num_examples(s)}"
        for s in ("train", "val", "test", "unlabeled")
        if s in info.shards
    )
    planes = "planes " + "-".join(str(p) for p in b.net.planes)
    if is_keras_cv(b.net.arch):  # a keras-cv backbone has its preset's widths
        planes = f"weights {b.net.weights}"
    other_epochs = [
        f"the {kind} {n}"
        for kind, n in (
            ("teacher", cfg.teacher_epochs),
            ("baselines", cfg.baseline_epochs),
            ("students", cfg.student_epochs),
        )
        if n
    ]
    teacher_epochs = f" ({', '.join(other_epochs)})" if other_epochs else ""
    kind_notes = "".join(
        f" {k.note.format(cfg=cfg)}" for k in plan.KINDS if k.note and k.enabled(cfg)
    )
    return [
        f"Data: `{b.data.data_dir}` ({info.source or 'converted tiles'}): {info.num_classes} "
        "classes "
        f"({', '.join(info.class_names)}), {info.tile_px} px tiles, tiles per split: {counts}."
        + (
            f" Extra unlabeled folders: {', '.join(b.data.unlabeled_dirs)}."
            if b.data.unlabeled_dirs
            else ""
        ),
        "",
        f"Every net: {b.net.arch} ({planes}), {b.epochs} epochs{teacher_epochs}, batch "
        f"{b.data.batch_size}, "
        f"{b.optim.name} lr {b.optim.learning_rate:g} weight decay {b.optim.weight_decay:g} "
        f"({b.optim.schedule}), "
        f"augmentation `{b.data.augment}`, LR views by `{b.data.lr_method}`, precision "
        f"{b.precision}, "
        f"seeds {', '.join(str(s) for s in cfg.seeds)}. Students: no labels, KD at "
        f"T={b.distill.temperature:g} "
        f"(weight {b.distill.kd_weight:g}) + feature-map {b.distill.feature_norm.upper()} "
        f"(weight {b.distill.feature_weight:g}, teacher map resized by {b.distill.feature_mode})."
        + kind_notes,
        "",
        f"Evaluated on the `{cfg.eval_split}` split (tile level; 95% CI by bootstrap, resampling "
        "slides). "
        "FLOPs are counted from each net's TensorFlow graph; the speedup is measured images/s at "
        "batch "
        f"{cfg.cost_batch_sizes[-1]} relative to the teacher on this machine. Wall time: "
        f"{wall_s / 60:.1f} min.",
        "",
    ]


def _table_sections(
    cfg, rows: Sequence[dict], prows: Sequence[dict], cascade: Sequence[dict]
) -> list[str]:
    """report.md's tables, each after the paragraph that says how it was made."""
    lines = []
    if len({r["seed"] for r in rows}) > 1:
        lines += [
            tables.SEEDS_NOTE,
            "",
            tables.seeds_markdown(rows, prows),
            tables.EVERY_SEED_NOTE,
            "",
        ]
    lines.append(tables.markdown_table(rows))
    if cascade:
        lines += [tables.CASCADE_NOTE, "", tables.cascade_markdown(cascade)]
    if prows:
        lines += [tables.PAIRED_NOTE, "", tables.paired_markdown(prows)]
    claims = factor_claims(rows, prows)
    if claims:
        lines += [tables.CLAIMS_NOTE, "", claims_markdown(claims)]
        if len(cfg.seeds) > 1:
            lines += ["Figures: seeds' means, bars ± 1 sd, dots = single seeds.", ""]
    return lines
