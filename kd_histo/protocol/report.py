"""Results of an experiment: one row per run, the tables, the figures and the report folder.

``result_rows`` (pure) joins each run's evaluation (metrics.json), its input size, the cost of
that input size and the wall time into one row, with the gap to the teacher of the same seed.
``write_tables`` writes results.csv / results.md / results.json into ``<out_dir>/report``;
``write_report`` adds the figures (accuracy vs GFLOPs, accuracy vs unlabeled fraction, confusion
matrices), copies of every metrics.json and TensorBoard log folder, the cascade rows
(``cascade_rows``: each student + its teacher on the least confident tiles; cascade.csv), and
report.md. With several seeds it reports mean ± sd per model (``seed_summary``), the figures show
the seeds' means with
their spread, and ``paired_table`` gives each student's paired difference to the baseline of its
factor (same seed and split) with a 95% interval over seeds and tiles
(``kd_histo.protocol.paired``).

Not here: running anything (``kd_histo.protocol.experiment``), metric formulas
(``kd_histo.evaluation.metrics``).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kd_histo import schema
from kd_histo.atomic import write_text
from kd_histo.evaluation import plots
from kd_histo.evaluation.evaluate import CASCADE_JSON, METRICS_JSON, PREDICTIONS_CSV
from kd_histo.protocol import paired
from kd_histo.protocol.claims import claims_markdown, factor_claims
from kd_histo.protocol.plan import cascade_dir, eval_dir

REPORT_DIR = "report"
CSV_COLUMNS = (
    "seed",
    "run",
    "kind",
    "factor",
    "input_px",
    "unlabeled_fraction",
    "n_eval",
    "accuracy",
    "accuracy_low",
    "accuracy_high",
    "balanced_accuracy",
    "macro_f1",
    "macro_auc",
    "slide_accuracy",
    "gap_to_teacher",
    "gflops",
    "flops_ratio",
    "speedup",
    "train_s",
)


def _metrics(spec, split: str) -> dict[str, Any] | None:

    path = os.path.join(eval_dir(spec, split), METRICS_JSON)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def result_rows(
    specs: Sequence,
    metrics: Mapping[str, dict],
    state: Mapping[str, dict],
    costs: Mapping[int, dict] | None,
) -> list[dict[str, Any]]:
    """One row per evaluated run.

    Args:
      specs: the experiment's RunSpecs.
      metrics: ``"s<seed>/<name>"`` -> that run's metrics.json (runs without one are left out).
      state: ``"s<seed>/<name>"`` -> {"train_s", "eval_s"} (experiment state.json).
      costs: input px -> cost row (``gflops``, ``flops_ratio_to_ref``, ``speedup``), or None
        before the cost is measured.

    Returns:
      Rows with the keys of :data:`CSV_COLUMNS` (None where unknown).
    """
    rows = []
    for spec in specs:
        key = f"s{spec.seed}/{spec.name}"
        m = metrics.get(key)
        if m is None:
            continue
        tile, ci = m["tile"], m["tile"]["ci95"]["accuracy"]
        px = int(m["run"]["input_px"])
        c = (costs or {}).get(px, {})
        rows.append(
            {
                "seed": spec.seed,
                "run": spec.name,
                "kind": spec.kind,
                "factor": spec.factor,
                "input_px": px,
                "unlabeled_fraction": spec.unlabeled_fraction,
                "n_eval": tile["n"],
                "accuracy": tile["accuracy"],
                "accuracy_low": ci["low"],
                "accuracy_high": ci["high"],
                "balanced_accuracy": tile["balanced_accuracy"],
                "macro_f1": tile["macro_f1"],
                "macro_auc": tile["macro_auc"],
                "slide_accuracy": m["slide_mean"]["accuracy"] if "slide_mean" in m else None,
                "gap_to_teacher": None,
                "gflops": c.get("gflops"),
                "flops_ratio": c.get("flops_ratio_to_ref"),
                "speedup": c.get("speedup"),
                "train_s": state.get(key, {}).get("train_s"),
            }
        )
    # Reading order: per seed, the teacher, then per factor the baseline and the students by
    # growing unlabeled fraction (training order differs: the largest pool trains first).
    rank = {"teacher": 0, "baseline": 1, "student": 2, "student_ce": 3}
    rows.sort(key=lambda r: (r["seed"], r["factor"], rank[r["kind"]], r["unlabeled_fraction"]))
    teacher = {r["seed"]: r["accuracy"] for r in rows if r["kind"] == "teacher"}
    for r in rows:
        if r["seed"] in teacher:
            r["gap_to_teacher"] = r["accuracy"] - teacher[r["seed"]]
    return rows


CASCADE_COLUMNS = (
    "seed",
    "run",
    "factor",
    "teacher_share",
    "n_teacher",
    "n_tiles",
    "accuracy",
    "gap_to_teacher",
    "gflops_per_tile",
    "tiles_per_s",
    "speedup_vs_teacher",
)


def cascade_rows(specs: Sequence, split: str) -> list[dict[str, Any]]:
    """One row per measured teacher share of each student's cascade
    (``cascade_<split>/cascade.json``), with the gap to the teacher alone on the same tiles."""

    out = []
    for spec in specs:
        path = os.path.join(cascade_dir(spec, split), CASCADE_JSON)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            rows = json.load(f)["rows"]
        teacher = next(r for r in rows if r["scored_by"] == "teacher")
        for r in rows:
            if r["scored_by"] == "cascade":
                out.append(
                    {
                        "seed": spec.seed,
                        "run": spec.name,
                        "factor": spec.factor,
                        **{k: r[k] for k in CASCADE_COLUMNS[3:] if k in r},
                        "gap_to_teacher": r["accuracy"] - teacher["accuracy"],
                    }
                )
    return out


def cascade_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The cascade table: student + teacher on the least confident share of the tiles."""
    lines = [
        "| student | teacher share | accuracy | gap to teacher | effective GFLOPs/tile | tiles/s | "
        "measured speedup | seed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {100 * r['teacher_share']:.1f}% | {r['accuracy']:.3f} | "
            f"{100 * r['gap_to_teacher']:+.1f} pts | {r['gflops_per_tile']:.4f} | "
            f"{r['tiles_per_s']:.0f} | "
            f"{r['speedup_vs_teacher']:.1f}x | {r['seed']} |"
        )
    return "\n".join(lines) + "\n"


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The one-glance table: model, input px, cost, measured speedup, accuracy [95% CI], gap."""
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "| model | input px | GFLOPs/image | FLOPs ÷ | measured speedup | accuracy [95% CI] | "
        "macro F1 | "
        "gap to teacher |" + (" seed |" if len(seeds) > 1 else ""),
        "|---|---:|---:|---:|---:|---|---:|---:|" + ("---:|" if len(seeds) > 1 else ""),
    ]
    for r in rows:
        acc = (
            f"{r['accuracy']:.3f} [{_num(r['accuracy_low'], '.3f')}, "
            f"{_num(r['accuracy_high'], '.3f')}]"
        )
        gap = (
            "—"
            if r["kind"] == "teacher"
            else _num(None if r["gap_to_teacher"] is None else 100 * r["gap_to_teacher"], "+.1f")
            + " pts"
        )
        lines.append(
            f"| {r['run']} | {r['input_px']} | {_num(r['gflops'], '.4f')} | "
            f"{_num(r['flops_ratio'], '.1f')} | "
            f"{_num(r['speedup'], '.1f')}x | {acc} | {r['macro_f1']:.3f} | {gap} |"
            + (f" {r['seed']} |" if len(seeds) > 1 else "")
        )
    return "\n".join(lines) + "\n"


def seed_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of each run's accuracy and gap (several seeds)."""
    out = []
    for name in dict.fromkeys(r["run"] for r in rows):
        sel = [r for r in rows if r["run"] == name]
        acc = paired.seed_stats([r["accuracy"] for r in sel])
        gaps = [r["gap_to_teacher"] for r in sel if r["gap_to_teacher"] is not None]
        out.append(
            {
                "run": name,
                "kind": sel[0]["kind"],
                "factor": sel[0]["factor"],
                "unlabeled_fraction": sel[0]["unlabeled_fraction"],
                "seeds": acc.n,
                "accuracy_mean": acc.mean,
                "accuracy_sd": acc.sd,
                "accuracy_values": list(acc.values),
                "gap_mean": statistics.fmean(gaps) if gaps else None,
            }
        )
    return out


def seeds_markdown(rows: Sequence[dict[str, Any]], prows: Sequence[dict[str, Any]] = ()) -> str:
    """The several-seed table: one row per model, accuracy mean ± sd and every seed's value, and
    each student's paired difference to the baseline of its factor (from :func:`paired_table`).

    Cost columns are the first seed's (the nets of one run name have one architecture and input).
    """
    paired_by = {r["student"]: r for r in prows}
    lines = [
        (
            "| model | input px | GFLOPs/image | measured speedup | accuracy, mean ± sd | per seed "
            "| "
            "− baseline, paired [95% CI] |"
        ),
        "|---|---:|---:|---:|---|---|---|",
    ]
    for s in seed_summary(rows):
        first = next(r for r in rows if r["run"] == s["run"])
        p = paired_by.get(s["run"])
        diff = (
            f"{100 * p['difference']:+.1f} [{100 * p['low']:+.1f}, {100 * p['high']:+.1f}] pts"
            if p
            else "—"
        )
        lines.append(
            f"| {s['run']} | {first['input_px']} | {_num(first['gflops'], '.4f')} | "
            f"{_num(first['speedup'], '.1f')}x | {s['accuracy_mean']:.3f} ± {s['accuracy_sd']:.3f} "
            "| "
            f"{' / '.join(f'{v:.3f}' for v in s['accuracy_values'])} | {diff} |"
        )
    return "\n".join(lines) + "\n"


def mean_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run for the figures: accuracy = the seeds' mean, low/high = mean ∓ sd.

    The other fields (kind, factor, input px, GFLOPs, unlabeled fraction) are the first seed's.
    """
    out = []
    for s in seed_summary(rows):
        first = next(r for r in rows if r["run"] == s["run"])
        m, sd = s["accuracy_mean"], s["accuracy_sd"]
        out.append(
            dict(first, accuracy=m, accuracy_low=m - sd, accuracy_high=m + sd, seeds=s["seeds"])
        )
    return out


def paired_table(
    specs: Sequence,
    correct: Mapping[str, Mapping[tuple, tuple[int, str]]],
    n_boot: int = 2000,
) -> list[dict[str, Any]]:
    """Each student against the baseline of its factor: paired accuracy difference over seeds.

    Args:
      specs: the experiment's RunSpecs.
      correct: ``"s<seed>/<name>"`` -> {tile key: (1 if correct else 0, slide id)} (see
        :func:`read_correct`); runs without predictions are left out.
      n_boot: bootstrap replicates.

    Returns:
      Rows ``factor, student, baseline, seeds, n_tiles, difference, low, high, per_seed``;
      differences are student minus baseline (accuracy, 0-1), only over seeds where both ran, and
      only over tiles both evaluated. Slides (or near-duplicate groups) are resampled whole.
    """
    out = []
    students = sorted(  # reading order: by factor, then by growing unlabeled fraction
        {
            (s.factor, s.kind == "student_ce", s.unlabeled_fraction, s.name)
            for s in specs
            if s.kind in ("student", "student_ce")
        }
    )
    for factor, _, _, name in students:
        base = next((s.name for s in specs if s.kind == "baseline" and s.factor == factor), None)
        if base is None:
            continue
        seeds = sorted(
            {
                s.seed
                for s in specs
                if f"s{s.seed}/{name}" in correct and f"s{s.seed}/{base}" in correct
            }
        )
        if not seeds:
            continue
        tables = [(correct[f"s{sd}/{name}"], correct[f"s{sd}/{base}"]) for sd in seeds]
        keys = sorted(set.intersection(*(set(a) & set(b) for a, b in tables)))
        if not keys:
            continue
        a = np.array([[t[0][k][0] for k in keys] for t in tables])
        b = np.array([[t[1][k][0] for k in keys] for t in tables])
        groups = [tables[0][0][k][1] for k in keys]
        diff = paired.paired_bootstrap(a, b, groups, n_boot=n_boot, seed=0)
        out.append(
            {
                "factor": factor,
                "student": name,
                "baseline": base,
                "seeds": diff.n_seeds,
                "n_tiles": diff.n_tiles,
                "difference": diff.mean,
                "low": diff.low,
                "high": diff.high,
                "per_seed": list(diff.per_seed),
            }
        )
    return out


def paired_markdown(prows: Sequence[dict[str, Any]]) -> str:
    """The paired comparisons as a markdown table (points of accuracy)."""
    lines = [
        "| factor | student | − baseline | seeds | tiles | difference [95% CI] | per seed |",
        "|---:|---|---|---:|---:|---|---|",
    ]
    for r in prows:
        per = ", ".join(f"{100 * d:+.1f}" for d in r["per_seed"])
        ci = f"[{100 * r['low']:+.1f}, {100 * r['high']:+.1f}]"
        lines.append(
            f"| x{r['factor']:g} | {r['student']} | {r['baseline']} | {r['seeds']} | "
            f"{r['n_tiles']} | {100 * r['difference']:+.1f} {ci} pts | {per} |"
        )
    return "\n".join(lines) + "\n"


def read_correct(spec, split: str) -> dict[tuple, tuple[int, str]] | None:
    """{(source, x, y): (correct, slide id)} of a run's labeled tiles; None if not evaluated."""
    return read_correct_folder(eval_dir(spec, split))


def scored_tile(row: Mapping[str, str], pred: str) -> tuple[tuple, tuple[int, str]]:
    """The key ``(source, x, y)`` and ``(correct, slide id)`` of one labeled tile of a predictions
    table (a run's ``predictions.csv`` or a bundle's ``tile_predictions.csv``), given its
    predicted class index."""
    return (row["source"], int(row["x"]), int(row["y"])), (
        int(int(pred) == int(row["label"])),
        row["slide_id"],
    )


def read_correct_folder(eval_folder: str) -> dict[tuple, tuple[int, str]] | None:
    """{(source, x, y): (correct, slide id)} of the labeled tiles in an evaluation folder's
    ``predictions.csv``; None when it holds none."""
    path = os.path.join(eval_folder, PREDICTIONS_CSV)
    if not os.path.isfile(path):
        return None
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if int(row["label"]) >= 0:
                key, score = scored_tile(row, row["pred"])
                out[key] = score
    return out


def _collect(cfg, specs, state, costs):
    metrics = {
        f"s{s.seed}/{s.name}": m for s in specs if (m := _metrics(s, cfg.eval_split)) is not None
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
    write_text(paths["csv"], _csv_text(rows))
    claims = factor_claims(rows, prows) if rows else []
    several = len({r["seed"] for r in rows}) > 1
    write_text(
        paths["md"],
        ((seeds_markdown(rows, prows) + "\n" + _EVERY_SEED_NOTE + "\n\n") if several else "")
        + markdown_table(rows)
        + (("\n" + paired_markdown(prows)) if prows else "")
        + (("\n" + _CLAIMS_NOTE + "\n\n" + claims_markdown(claims)) if claims else ""),
    )
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
        if s.kind != "teacher" and (c := read_correct(s, cfg.eval_split)) is not None
    }
    return paired_table(specs, correct, n_boot=max(cfg.n_boot, 1000))


def _csv_text(rows, columns: Sequence[str] = CSV_COLUMNS) -> str:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


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
    first_seed = min(r["seed"] for r in rows)
    shown = [r for r in rows if r["seed"] == first_seed]
    several = len({r["seed"] for r in rows}) > 1
    # Several seeds: the seeds' means, bars = ± sd, and every seed as a small dot.
    plotted, dots = (mean_rows(rows), rows) if several else (shown, None)
    paths["accuracy_vs_gflops"] = plots.accuracy_vs_gflops_png(
        plotted,
        os.path.join(out, "accuracy_vs_gflops.png"),
        f"{cfg.title}: accuracy vs compute",
        seed_rows=dots,
    )
    if any(r["unlabeled_fraction"] > 0 for r in rows):
        paths["accuracy_vs_unlabeled"] = plots.accuracy_vs_unlabeled_png(
            plotted,
            os.path.join(out, "accuracy_vs_unlabeled.png"),
            f"{cfg.title}: more unlabeled data",
            seed_rows=dots,
        )
    info = schema.DatasetInfo.read(cfg.base.data.data_dir)
    cms = [
        (r["run"], metrics[f"s{first_seed}/{r['run']}"]["tile"]["confusion_matrix"]) for r in shown
    ]
    paths["confusion_matrices"] = plots.confusion_grid_png(
        cms, info.class_names, os.path.join(out, "confusion_matrices.png")
    )
    for s in specs:  # copies, so the report folder stands alone
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
    crows = cascade_rows(specs, cfg.eval_split)
    if crows:
        paths["cascade_csv"] = os.path.join(out, "cascade.csv")
        write_text(paths["cascade_csv"], _csv_text(crows, CASCADE_COLUMNS))
    paths["report"] = os.path.join(out, "report.md")
    write_text(
        paths["report"],
        report_markdown(cfg, rows, info, wall_s, paths, command, prows, cascade=crows),
    )
    return paths


# Paragraphs of report.md that say how a table was made (each comes before its table).
_CASCADE_NOTE = (
    "Cascade: each student scores every tile, its seed's teacher re-scores the least confident "
    "share of them at high resolution (`kd_histo.evaluation.cascade`). Effective GFLOPs per tile = "
    "student + "
    "share x teacher; tiles/s measured with both nets on the split's tiles held in memory (reading "
    "not timed), the speedup relative to the teacher alone on the same tiles (`cascade.csv`)."
)
_PAIRED_NOTE = (
    "Student − baseline of the same factor, paired (same seed, split and tiles): mean over "
    "seeds and tiles, 95% CI by bootstrap resampling seeds and slides (near-duplicate "
    "groups when the split was made with them) together:"
)

_SEEDS_NOTE = (
    "Over seeds: test accuracy mean ± sd, each seed's value (in seed order), and each student's "
    "paired difference to the baseline of its factor (same seed and tiles; 95% CI by bootstrap "
    "over seeds and slides together):"
)
_EVERY_SEED_NOTE = "Every run of every seed:"

_CLAIMS_NOTE = (
    "The paper's claims per factor: the label-free student with the highest mean accuracy against "
    "the teacher and (paired, as above) against the LR baseline, and the label-free students' mean "
    "accuracy as the unlabeled fraction grows:"
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
    b = cfg.base
    counts = ", ".join(
        f"{s} {info.num_examples(s)}"
        for s in ("train", "val", "test", "unlabeled")
        if s in info.shards
    )
    planes = "-".join(str(p) for p in b.net.planes) or "default"
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
    labeled_ce = (
        f" Runs `student_ce_*`: the same student that also learns from the labels where they exist "
        f"(cross-entropy weight {cfg.labeled_student_ce:g})."
        if cfg.labeled_student_ce
        else ""
    )
    lines = [
        f"# {cfg.title}",
        "",
        f"Data: `{b.data.data_dir}` ({info.source or 'converted tiles'}): {info.num_classes} "
        "classes "
        f"({', '.join(info.class_names)}), {info.tile_px} px tiles, tiles per split: {counts}."
        + (
            f" Extra unlabeled folders: {', '.join(b.data.unlabeled_dirs)}."
            if b.data.unlabeled_dirs
            else ""
        ),
        "",
        f"Every net: {b.net.arch} (planes {planes}), {b.epochs} epochs{teacher_epochs}, batch "
        f"{b.data.batch_size}, "
        f"{b.optim.name} lr {b.optim.learning_rate:g} weight decay {b.optim.weight_decay:g} "
        f"({b.optim.schedule}), "
        f"augmentation `{b.data.augment}`, LR views by `{b.data.lr_method}`, precision "
        f"{b.precision}, "
        f"seeds {', '.join(str(s) for s in cfg.seeds)}. Students: no labels, KD at "
        f"T={b.distill.temperature:g} "
        f"(weight {b.distill.kd_weight:g}) + feature-map {b.distill.feature_norm.upper()} "
        f"(weight {b.distill.feature_weight:g}, teacher map resized by {b.distill.feature_mode})."
        + labeled_ce,
        "",
        f"Evaluated on the `{cfg.eval_split}` split (tile level; 95% CI by bootstrap, resampling "
        "slides). "
        "FLOPs are counted from each net's TensorFlow graph; the speedup is measured images/s at "
        "batch "
        f"{cfg.cost_batch_sizes[-1]} relative to the teacher on this machine. Wall time: "
        f"{wall_s / 60:.1f} min.",
        "",
    ]
    if len({r["seed"] for r in rows}) > 1:
        lines += [_SEEDS_NOTE, "", seeds_markdown(rows, prows), _EVERY_SEED_NOTE, ""]
    lines.append(markdown_table(rows))
    if cascade:
        lines += [_CASCADE_NOTE, "", cascade_markdown(cascade)]
    if prows:
        lines += [_PAIRED_NOTE, "", paired_markdown(prows)]
    claims = factor_claims(rows, prows)
    if claims:
        lines += [_CLAIMS_NOTE, "", claims_markdown(claims)]
        if len(cfg.seeds) > 1:
            lines += ["Figures: seeds' means, bars ± 1 sd, dots = single seeds.", ""]
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
