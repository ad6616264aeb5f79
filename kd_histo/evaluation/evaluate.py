"""Evaluation of a trained network on a split: tile and slide level metrics, files, run comparison.

``predict_split`` runs the network of a run folder over a split (no augmentation, file order);
``evaluate_predictions`` turns per-tile probabilities into tile-level metrics and slide-level
metrics (tile probabilities per slide aggregated by their mean, and by majority vote of the tile
predictions), each with bootstrap 95% intervals (resampling slides when slide ids exist);
``write_evaluation`` writes predictions.csv, confusion_matrix.png, roc.png and, last and atomically,
metrics.json: the experiment runner takes its presence as "this evaluation is done";
Several runs in one table: ``kd_histo.evaluation.compare_table``.
With a cascade teacher, ``evaluate_run`` also measures the cascade curve on the same tiles
(``kd_histo.evaluation.cascade.measure_curve``) and ``write_cascade`` writes cascade.json/.csv/.png.

Not here: the metric formulas (``kd_histo.evaluation.metrics``), figures
(``kd_histo.evaluation.plots``), flags
(``kd_histo.cli.evaluate``).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from kd_histo import atomic, schema
from kd_histo.data.pipeline import batch_tiles, make_dataset
from kd_histo.evaluation import metrics, ood_report, plots, probes
from kd_histo.evaluation.cascade import (
    CSV_COLUMNS,
    DEFAULT_FRACTIONS,
    measure_curve,
    n_for_teacher,
)
from kd_histo.evaluation.cost import count_flops
from kd_histo.evaluation.teachers import check_teacher_runs, load_cascade_teacher
from kd_histo.models import load_model, ood
from kd_histo.progress import progress
from kd_histo.settings import OOD_WARN_HELP, SKIP_CORRUPT_HELP, setting
from kd_histo.training.run_record import RunRecord, read_run_record

_LOG = logging.getLogger(__name__)
METRICS_JSON = "metrics.json"
PREDICTIONS_CSV = "predictions.csv"


@dataclasses.dataclass(frozen=True)
class Predictions:
    """Per-tile outputs of one network on one split."""

    probs: np.ndarray  # [N, C] float
    labels: np.ndarray  # [N] int, -1 = unlabeled
    slide_ids: np.ndarray  # [N] str
    sources: np.ndarray  # [N] str
    x: np.ndarray  # [N] int
    y: np.ndarray  # [N] int
    ood_scores: np.ndarray | None = None  # [N] float, with the run's OOD statistics


def slide_level(preds: Predictions, num_classes: int) -> dict[str, Any]:
    """Aggregates tiles to slides.

    Returns:
      {"slide_ids", "labels" (the slide's majority tile label), "mean_probs" [S, C] (mean of tile
      probabilities), "vote_probs" [S, C] (fraction of tiles predicted as each class)}.
    """
    ids = np.unique(preds.slide_ids)
    tile_pred = preds.probs.argmax(1)
    labels, mean_p, vote_p = [], [], []
    for s in ids:
        m = preds.slide_ids == s
        labels.append(np.bincount(preds.labels[m], minlength=num_classes).argmax())
        mean_p.append(preds.probs[m].mean(0))
        vote_p.append(np.bincount(tile_pred[m], minlength=num_classes) / m.sum())
    return {
        "slide_ids": ids,
        "labels": np.asarray(labels, int),
        "mean_probs": np.asarray(mean_p),
        "vote_probs": np.asarray(vote_p),
    }


def evaluate_predictions(
    preds: Predictions, class_names: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Tile- and slide-level metrics with bootstrap intervals (labeled tiles only).

    Raises:
      ValueError: no labeled tile in the split.
    """
    keep = preds.labels >= 0
    if not keep.any():
        raise ValueError(
            "the split has no labeled tiles; evaluate on a labeled split (val or test)"
        )
    p = Predictions(
        *(None if f is None else np.asarray(f)[keep] for f in dataclasses.astuple(preds))
    )
    has_slides = bool(np.any(p.slide_ids != ""))
    tile = metrics.classification_report(p.labels, p.probs, class_names)
    tile["ci95"] = metrics.bootstrap_ci(
        p.labels, p.probs, p.slide_ids if has_slides else None, n_boot=n_boot, seed=seed
    )
    out = {
        "tile": tile,
        "class_names": list(class_names),
        "n_unlabeled_skipped": int((~keep).sum()),
    }
    if has_slides:
        s = slide_level(p, len(class_names))
        for how, key in (("mean", "mean_probs"), ("majority", "vote_probs")):
            rep = metrics.classification_report(s["labels"], s[key], class_names)
            rep["ci95"] = metrics.bootstrap_ci(s["labels"], s[key], None, n_boot=n_boot, seed=seed)
            out[f"slide_{how}"] = rep
    return out


def write_evaluation(
    result: dict[str, Any], preds: Predictions, out_dir: str, title: str = ""
) -> dict[str, str]:
    """Writes predictions.csv, confusion_matrix.png, roc.png, then metrics.json (the marker of a
    finished evaluation: removed first, written last and whole); returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    names = result["class_names"]
    paths = {
        k: os.path.join(out_dir, v)
        for k, v in (
            ("metrics", METRICS_JSON),
            ("predictions", PREDICTIONS_CSV),
            ("confusion", "confusion_matrix.png"),
            ("roc", "roc.png"),
        )
    }
    _remove_marker(paths["metrics"])  # a rewrite killed half-way must not look finished
    write_predictions_csv(
        preds, names, paths["predictions"], result.get("ood", {}).get("threshold")
    )
    keep = preds.labels >= 0
    plots.confusion_matrix_png(
        np.asarray(result["tile"]["confusion_matrix"]), names, paths["confusion"], title
    )
    plots.roc_png(preds.labels[keep], preds.probs[keep], names, paths["roc"], title)
    atomic.write_json(paths["metrics"], result, sort_keys=False)  # last: "evaluation done"
    return paths


def _remove_marker(path: str) -> None:
    """Removes a previous run's completion marker (metrics.json, cascade.json) before rewriting
    the files it vouches for; the marker is written again, whole, once they all are."""
    if os.path.isfile(path):
        os.remove(path)


def write_predictions_csv(
    preds: Predictions,
    class_names: Sequence[str],
    path: str,
    ood_threshold: float | None = None,
) -> str:
    """One row per tile: source, slide_id, x, y, label, pred, pred_name, prob_<class>..., and with
    out-of-domain scores ood_score and ood_flag (1 = above ``ood_threshold``)."""
    scored = preds.ood_scores is not None and ood_threshold is not None
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["source", "slide_id", "x", "y", "label", "pred", "pred_name"]
            + [f"prob_{c}" for c in class_names]
            + (["ood_score", "ood_flag"] if scored else [])
        )
        for i in range(len(preds.probs)):
            k = int(preds.probs[i].argmax())
            w.writerow(
                [
                    preds.sources[i],
                    preds.slide_ids[i],
                    int(preds.x[i]),
                    int(preds.y[i]),
                    int(preds.labels[i]),
                    k,
                    class_names[k],
                ]
                + [f"{v:.6f}" for v in preds.probs[i]]
                + (
                    [f"{preds.ood_scores[i]:.4f}", int(preds.ood_scores[i] > ood_threshold)]
                    if scored
                    else []
                )
            )
    return path


def probs_function(model, dtype: str = "float32"):
    """numpy batch [B, H, W, 3] -> softmax probabilities [B, C] of ``model``, traced once per tile
    size (:func:`kd_histo.evaluation.ood_report.per_tile_size`, as the probabilities-and-score
    function is, so that the score's measured cost is the score's alone). ``dtype`` "uint8"
    takes 0-255 tiles and scales them as the pipeline does."""

    def softmax_probs(x):
        x = tf.image.convert_image_dtype(x, tf.float32)  # uint8 -> [0, 1]; float32 unchanged
        out = model(x, training=False)
        return tf.nn.softmax(tf.cast(out["logits"] if isinstance(out, dict) else out, tf.float32))

    fn = ood_report.per_tile_size(softmax_probs, dtype)
    return lambda x: fn(x).numpy()


def predict_split(model, ds, view: str) -> Predictions:
    """Runs ``model`` over a dataset of contract batches, feeding ``batch[view]``."""
    return predict_split_keeping(model, ds, view, keep=())[0]


def predict_split_keeping(
    model, ds, view: str, keep: Sequence[str], probs_of=None, ood_stats=None
) -> tuple[Predictions, dict[str, np.ndarray]]:
    """:func:`predict_split`, also returning the batches' ``keep`` views stacked in tile order
    ("hr" as uint8 0-255, exactly the decoded pixels; other views float32). ``probs_of``: the
    model's :func:`probs_function` when the caller has one (one trace fewer). ``ood_stats``: the
    run's :class:`kd_histo.models.ood.OODStats`; each tile's score is then measured too."""
    probs_of = probs_of or probs_function(model)
    both = ood_report.probs_and_ood_function(model, ood_stats) if ood_stats is not None else None
    cols: dict[str, list] = {k: [] for k in ("probs", "labels", "slide_ids", "sources", "x", "y")}
    scores: list[np.ndarray] = []
    kept: dict[str, list] = {k: [] for k in keep}
    for b in ds:
        if both is None:
            cols["probs"].append(probs_of(b[view]))
        else:
            probs, score = both(b[view])
            cols["probs"].append(probs)
            scores.append(score)
        cols["labels"].append(b["label"].numpy())
        cols["slide_ids"].append(b["slide_id"].numpy().astype(str))
        cols["sources"].append(b["source"].numpy().astype(str))
        cols["x"].append(b["x"].numpy())
        cols["y"].append(b["y"].numpy())
        for k in keep:
            v = b[k].numpy()
            kept[k].append(np.round(v * 255).astype(np.uint8) if k == "hr" else v)
    if not cols["probs"]:
        raise ValueError("the split is empty; nothing to evaluate")
    preds = Predictions(
        *(np.concatenate(cols[k]) for k in ("probs", "labels", "slide_ids", "sources", "x", "y")),
        ood_scores=np.concatenate(scores) if scores else None,
    )
    return preds, {k: np.concatenate(v) for k, v in kept.items()}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One evaluation of a run folder on a split.

    Attributes:
      model_dir: run folder with run.json and model.keras (from ``kd_histo.training.train``).
      split: "test" or "val".
      data_dir: converted data folder; "" = the run's own (run.json).
      out_dir: results folder; "" = ``<model_dir>/eval_<split>``.
      batch_size: tiles per batch.
      n_boot: bootstrap replicates.
      seed: bootstrap seed.
      cascade_teacher: a teacher run folder: also measure the cascade (the teacher re-scores the
        student's least confident tiles) at ``cascade_fractions``; "" = no cascade.
      cascade_fractions: teacher shares of the cascade curve.
      skip_corrupt: skip corrupt records of the split; metrics.json counts them
        (``n_corrupt_skipped``).
      ood_warn_fraction: a slide with more of its tiles out of the model's domain gets a warning.
    """

    model_dir: str = setting(help="Run folder (holds run.json and model.keras).")
    split: str = setting("test", "Split to evaluate: test or val.")
    # kd-histo-train's --data_dir is required (no default); here unset means the run's own data.
    data_dir: str = setting(
        "",
        "Folder with shards; default the run's own data set.",
        flag_default=None,
        unset_is_default=True,
    )
    out_dir: str = setting("", "Where to write results; default <model_dir>/eval_<split>.")
    # The binaries share --batch_size (one default per process): kd-histo-evaluate gives 32.
    batch_size: int = setting(64, "Tiles per batch.", flag_default=32)
    n_boot: int = setting(1000, "Bootstrap replicates of the 95% intervals.")
    seed: int = 0
    cascade_teacher: str = setting(
        "",
        "Teacher run folder (or a model from elsewhere with a teacher.json naming its logits): "
        "also measure the cascade (the teacher re-scores the student's least confident tiles at "
        "high resolution); several, "
        "comma-separated: their ensemble (mean probability, cost the sum of theirs).",
    )
    cascade_fractions: tuple[float, ...] = setting(
        DEFAULT_FRACTIONS,
        "Teacher shares of the cascade's accuracy-vs-cost curve (cascade.csv, cascade.png).",
    )
    skip_corrupt: bool = setting(False, SKIP_CORRUPT_HELP)
    ood_warn_fraction: float = setting(ood.WARN_FRACTION, OOD_WARN_HELP)

    def __post_init__(self):
        if not 0.0 <= self.ood_warn_fraction <= 1.0:
            raise ValueError(f"ood_warn_fraction must be in [0, 1], got {self.ood_warn_fraction}")
        for f in self.cascade_fractions:
            n_for_teacher(1, f)  # one line for a fraction outside [0, 1]
        if self.cascade_teacher and not self.cascade_fractions:
            raise ValueError(
                "the cascade needs at least one fraction, e.g. --cascade_fractions=0,0.1"
            )


def check_finite_outputs(probs: np.ndarray, model_path: str, split: str) -> None:
    """Refuses probabilities with NaN/inf (finite weights can still overflow to inf logits)."""
    bad = int((~np.isfinite(probs)).any(axis=1).sum()) if len(probs) else 0
    if bad:
        raise ValueError(
            f"{model_path}: refused, the network outputs NaN/inf for {bad} of {len(probs)} "
            f"{split} tiles (the training diverged); retrain it with a lower --learning_rate"
        )


def _checked_data(cfg: EvalConfig, run: RunRecord) -> tuple[str, schema.DatasetInfo]:
    """The data folder to evaluate on and its dataset.json, checked to fit the run."""
    data_dir = cfg.data_dir or run.data_dir
    info = schema.DatasetInfo.read(data_dir)
    check_classes(run, info.class_names, data_dir)
    schema.shard_paths(data_dir, cfg.split)  # a missing split fails here with the folder's name
    if run.hr_px > info.tile_px:  # the pipeline's own message names a training flag
        raise ValueError(
            f"{data_dir} has {info.tile_px} px tiles but the model was trained on {run.hr_px} px "
            f"tiles; evaluate on data converted with kd-histo-convert --tile_px={run.hr_px} (or "
            "more)"
        )
    return data_dir, info


def evaluate_run(cfg: EvalConfig, log=_LOG.warning) -> dict[str, str]:
    """Predicts a split with a run's network, computes the metrics, writes the files; returns paths.

    The network's input view is made as its training made it (the run record's factor, HR size
    and ``lr_method``). With ``cfg.cascade_teacher`` the cascade curve is measured on the same
    tiles and written too (:func:`write_cascade`).
    """

    run = read_run_record(cfg.model_dir)
    teacher_runs = check_teacher_runs(cfg.cascade_teacher, run) if cfg.cascade_teacher else ()
    teacher_run = teacher_runs[0] if teacher_runs else None
    data_dir, info = _checked_data(cfg, run)
    model = load_model(run.model_path(cfg.model_dir), expected_num_classes=info.num_classes)
    pipe = dataclasses.replace(
        run.pipeline_config(data_dir, cfg.batch_size), skip_corrupt=cfg.skip_corrupt
    )
    ds = make_dataset(pipe, cfg.split, training=False)
    n = info.num_examples(cfg.split)
    ds = progress(ds, total=n, desc=f"evaluate {cfg.split}", unit="tiles", size=batch_tiles)
    keep = tuple(dict.fromkeys((run.view, "hr"))) if teacher_run else ()
    student_fn = probs_function(model)
    stats = ood.load_for(cfg.model_dir, run.stain_reference is not None)
    if stats is None:
        log(ood.NO_STATS)
    preds, kept = predict_split_keeping(
        model, ds, run.view, keep=keep, probs_of=student_fn, ood_stats=stats
    )
    check_finite_outputs(preds.probs, run.model_path(cfg.model_dir), cfg.split)
    result = evaluate_predictions(preds, info.class_names, n_boot=cfg.n_boot, seed=cfg.seed)
    if stats is not None:
        result["ood"] = ood_report.summary(
            preds.slide_ids, preds.ood_scores, stats, cfg.ood_warn_fraction
        )
    if cfg.skip_corrupt:  # every record not read back was skipped (dataset.json counts them all)
        result["n_corrupt_skipped"] = info.num_examples(cfg.split) - len(preds.probs)
    result["run"] = {
        "model_dir": os.path.abspath(cfg.model_dir),
        "mode": run.mode,
        "view": run.view,
        "factor": run.factor,
        "lr_method": run.lr_method,
        "input_px": run.input_px,
        "data_dir": data_dir,
        "split": cfg.split,
    }
    if run.linear_probe is not None:  # an embedding-only teacher's student: both linear heads
        acc = result["tile"]["accuracy"]
        args = (run, cfg.model_dir, data_dir, cfg.split, acc, cfg.batch_size, log)
        result["linear_probe"] = dataclasses.asdict(probes.evaluate_probes(*args))
    out_dir = cfg.out_dir or os.path.join(cfg.model_dir, f"eval_{cfg.split}")
    title = f"{os.path.basename(os.path.normpath(cfg.model_dir))} ({cfg.split})"
    paths = write_evaluation(result, preds, out_dir, title)
    if teacher_run is not None:
        teacher = load_cascade_teacher(cfg.cascade_teacher, teacher_runs, info.num_classes)
        if run.view == "hr":  # the kept "hr" tiles are uint8
            student_fn = probs_function(model, "uint8")
        rows = measure_curve(
            student_fn,
            probs_function(teacher.model, "uint8"),
            kept[run.view],
            kept["hr"],
            preds.labels,
            student_gflops=count_flops(model, run.input_px) / 1e9,
            teacher_gflops=teacher.gflops,
            fractions=cfg.cascade_fractions,
            batch_size=cfg.batch_size,
        )
        about = {
            "student": os.path.abspath(cfg.model_dir),
            "teacher": ",".join(os.path.abspath(t) for t in teacher.runs),
            "split": cfg.split,
            "data_dir": data_dir,
            "timing": "both nets on tiles held in memory "
            f"(reading not timed), batch {cfg.batch_size}, this machine",
        }
        paths.update(write_cascade(rows, about, out_dir, f"{title}: cascade to the teacher"))
    return paths


CASCADE_JSON, CASCADE_CSV, CASCADE_PNG = "cascade.json", "cascade.csv", "cascade.png"


def write_cascade(
    rows: Sequence[dict[str, Any]], about: dict[str, Any], out_dir: str, title: str = ""
) -> dict[str, str]:
    """cascade.json (rows + what was measured), cascade.csv and cascade.png (accuracy against
    effective GFLOPs per tile) in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "cascade_json": os.path.join(out_dir, CASCADE_JSON),
        "cascade_csv": os.path.join(out_dir, CASCADE_CSV),
        "cascade_png": os.path.join(out_dir, CASCADE_PNG),
    }
    _remove_marker(paths["cascade_json"])
    with open(paths["cascade_csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    plots.cascade_png(rows, paths["cascade_png"], title)
    # Last and whole: the experiment runner takes cascade.json as "cascade measured".
    atomic.write_json(paths["cascade_json"], {**about, "rows": list(rows)}, sort_keys=False)
    return paths


def check_classes(run: RunRecord, class_names: Sequence[str], data_dir: str) -> None:
    """The data's classes are the network's, in the same order; else one line saying so."""
    if tuple(class_names) != run.class_names:
        raise ValueError(
            f"{data_dir} has classes {list(class_names)} but the model was trained on "
            f"{list(run.class_names)}; evaluate on data converted with the same classes"
        )
