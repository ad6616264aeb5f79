"""A trained network on new data: tile folders, converted shards, or whole-slide images.

Tile folders and shards become tiles at the run's HR size (the run record's ``hr_px``) and the LR
view is made as in training (the record's factor and ``lr_method``, antialiased). Slides are tiled
on the grid of HR tiles at the record's µm/px of the training tiles (or ``read_mpp`` when given),
tissue tiles only, and each tile is read at the model's own resolution from the slide's pyramid
(``kd_histo.evaluation.slide_reader``: a student x8 reads the level at 8x the µm/px, never level
0; a slide without that level is shrunk from a finer one, with a note) by parallel reader threads,
while the model, one compiled graph, runs on the previous batch. Tiles from a folder are grouped
into "slides" by their parent folder; unreadable images are skipped and listed in
``skipped.csv``, as conversion does. With a cascade teacher (``cascade_teacher``) the teacher
re-scores the student's least confident tiles of each group (a slide, a folder group, a shards
input) from their HR tiles, read again (from a slide at the teacher's own level).

The files written (``predictions.csv``, ``slides.csv``, and per slide its QuPath GeoJSON, its
probability OME-TIFF and, with ``heatmap``, its heatmaps) are described in
``kd_histo.evaluation.prediction_files``.

Not here: metrics against labels (``kd_histo.evaluation.evaluate``), training
(``kd_histo.training.train``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator

import numpy as np

from kd_histo.evaluation import cohort, input_paths
from kd_histo.evaluation.input_paths import tile_mpp
from kd_histo.evaluation.predict_inputs import Tiles, folder_tiles
from kd_histo.evaluation.prediction_files import ScoredGroup
from kd_histo.evaluation.qupath_out import OBJECT_TYPES
from kd_histo.evaluation.slide_predict import predict_slide, warm_up
from kd_histo.evaluation.tile_classifier import classify_tiles, hr_classifier, slide_classifier
from kd_histo.models import NET_OPS, ood
from kd_histo.progress import progress
from kd_histo.settings import (
    NUM_TASKS_HELP,
    OOD_WARN_HELP,
    SKIP_CORRUPT_HELP,
    SLIDE_MPP_HELP,
    TASK_INDEX_HELP,
    setting,
)
from kd_histo.training.run_record import RUN_JSON, RunRecord

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """What to predict and where to write.

    Attributes:
      model_dir: run folder (run.json + model.keras).
      inputs: tile folders, converted data folders (dataset.json), slide files or globs; folders
        are searched for slides too (``kd_histo.evaluation.input_paths``).
      inputs_file: a text file of further inputs, one a line.
      model: instead of ``model_dir``, a folder written by kd-histo-export
        (``kd_histo.evaluation.exported``).
      out_dir: output folder.
      split: split read from a converted data folder.
      batch_size: tiles per forward pass.
      read_mpp: µm/px at which slides are read into HR tiles; 0 = the run record's ``mpp`` (the
        training tiles'), which must then be known.
      slide_mpp: level-0 µm/px of slides whose metadata lacks it (0 = from the metadata).
      min_tissue: fraction of a slide tile that must be tissue.
      max_tiles: at most this many tiles per slide (evenly spaced); 0 = all.
      heatmap: write a heatmap per slide.
      heatmap_classes: draw one heatmap per class named here (implies ``heatmap``); empty = one,
        of the class with the highest mean probability.
      qupath_object_type: QuPath object type of the tiles in ``<slide>.geojson``.
      num_workers: slides: reader threads, each with its own OpenSlide handle (0 = read in the
        thread that runs the model).
      cascade_teacher: a teacher run folder (or a foreign model with a teacher.json naming its
        logits): the teacher re-scores the student's least confident
        tiles of each slide (tile folder group, shards input) from their HR tiles; "" = off.
      cascade_fraction: share of each group's tiles the teacher re-scores
      (``kd_histo.evaluation.cascade.select``).
      cascade_threshold: instead, the teacher re-scores tiles whose top probability is below this.
      skip_corrupt: converted data folders: skip corrupt records (and log how many).
      ood_warn_fraction: a slide with more of its tiles out of the model's domain gets a warning
        (runs with ``ood.npz``; the scores are in predictions.csv, the shares in slides.csv).
      task_index, num_tasks: this task's share of the inputs (``kd_histo.evaluation.cohort``).
    """

    # Shared with the binaries where --model_dir is required: unset here is "" (then --model).
    model_dir: str = setting(
        "",
        "Run folder of the model (run.json + model.keras).",
        flag_default=None,
        unset_is_default=True,
    )
    inputs: tuple[str, ...] = setting((), input_paths.INPUTS_HELP)
    inputs_file: str = setting("", input_paths.INPUTS_FILE_HELP)
    model: str = setting("", "Instead of --model_dir: a model folder written by kd-histo-export.")
    # --out_dir is shared by the binaries (one default per process): unset here means ./predictions.
    out_dir: str = setting(
        "predictions",
        "Where the CSVs and heatmaps go (default ./predictions).",
        flag_default="",
        unset_is_default=True,
    )
    split: str = setting("test", "Split read from a converted data folder.")
    # The binaries share --batch_size (one default per process): kd-histo-predict gives 32.
    batch_size: int = setting(64, "Tiles per batch.", flag_default=32)
    # Not convert's --target_mpp (the µm/px tiles are cut at): an override of the run's µm/px.
    read_mpp: float = setting(
        0.0,
        "Slides: µm/px at which to read the HR tiles, overriding the run's training tiles' µm/px "
        "(run.json); needed when that is unknown (0 = the run's).",
    )
    slide_mpp: float = setting(0.0, SLIDE_MPP_HELP)
    min_tissue: float = setting(0.5, "Slides: fraction of tissue a tile needs.")
    max_tiles: int = setting(0, "Slides: at most this many tiles per slide (0 = all).")
    heatmap: bool = setting(False, "Slides: write a probability heatmap over the thumbnail.")
    heatmap_classes: tuple[str, ...] = setting(
        (),
        "Slides: one heatmap per class named (implies --heatmap); default one, of the class "
        "with the highest mean probability.",
    )
    qupath_object_type: str = setting(
        "tile", "QuPath object type of the tiles in <slide>.geojson.", choices=OBJECT_TYPES
    )
    skip_corrupt: bool = setting(False, SKIP_CORRUPT_HELP)
    ood_warn_fraction: float = setting(ood.WARN_FRACTION, OOD_WARN_HELP)
    num_workers: int = setting(
        2, "Parallel workers: kd-histo-predict's slide reader threads (0 = in this process)."
    )
    cascade_teacher: str = setting(
        "",
        "Teacher run folder (or a model from elsewhere with a teacher.json naming its logits): "
        "it re-scores the student's least confident tiles at high resolution (with "
        "--cascade_fraction or --cascade_threshold).",
    )
    cascade_fraction: float | None = setting(
        None,
        "Cascade: share of each slide's (or folder's) tiles the teacher re-scores, the least "
        "confident first.",
    )
    cascade_threshold: float | None = setting(
        None,
        "Cascade: instead, the teacher re-scores every tile whose top class probability is below "
        "this.",
    )

    task_index: int = setting(0, TASK_INDEX_HELP)
    num_tasks: int = setting(1, NUM_TASKS_HELP)

    @property
    def network_dir(self) -> str:
        """The folder holding the network's run.json: the exported model's, or the run's."""
        return self.model or self.model_dir

    def __post_init__(self):
        if self.num_tasks < 1 or not 0 <= self.task_index < self.num_tasks:
            raise ValueError(
                f"need 0 <= --task_index < --num_tasks, got {self.task_index} and {self.num_tasks}"
            )
        if bool(self.model_dir) == bool(self.model):
            raise ValueError("give one of --model_dir=<run folder> or --model=<exported model>")
        given = (self.cascade_fraction is not None) + (self.cascade_threshold is not None)
        if self.cascade_teacher and given != 1:
            raise ValueError(
                "--cascade_teacher needs one of --cascade_fraction=F or --cascade_threshold=P"
            )
        if not self.cascade_teacher and given:
            raise ValueError(
                "--cascade_fraction/--cascade_threshold need --cascade_teacher=<teacher run folder>"
            )


def predict(cfg: PredictConfig, log: Callable[[str], None] = lambda line: None) -> dict[str, str]:
    """Predicts this task's share of the inputs, each written when it finishes
    (``kd_histo.evaluation.cohort``: a rerun resumes), then (one task) the cohort's tables.

    ``log`` receives one line per converted data folder read with ``skip_corrupt``: how many
    corrupt records were skipped.

    Returns:
      {name: path} of the files written ("predictions", "slides", "geojson:<slide>"...); {} for a
      task of several (``--merge`` writes the tables).
    """
    from kd_histo.evaluation import prediction_files as files
    from kd_histo.evaluation.exported import load_network
    from kd_histo.evaluation.heatmap import check_classes
    from kd_histo.evaluation.teachers import load_teacher

    model, run = load_network(cfg.model_dir, cfg.model)
    names = list(run.class_names)
    check_classes(names, cfg.heatmap_classes)
    # globs, --inputs_file, folders' slides: all inputs found and checked before any work
    kinds = dict(input_paths.resolve(cfg.inputs, cfg.inputs_file, run.hr_px))
    where = cfg.network_dir
    mpp = tile_mpp(run, cfg.read_mpp, where) if "slide" in kinds.values() else 0.0
    if run.lr_method == "pyramid" and "folder" in kinds.values():
        _LOG.warning(
            f"{where} was trained on pyramid LR tiles; tile folders get an "
            "antialiased area resize of the HR tile instead (slides are read from their own "
            "pyramid level)"
        )
    scorer = _Scorer(model, run, cfg, load_teacher(cfg.cascade_teacher, run), mpp)
    if mpp:  # slides among the inputs: the model's one-off set-up before the first slide's clock
        warm_up(scorer.classify, run, cfg.batch_size)
    stats = scorer.ood
    columns = cohort.Columns(
        tuple(names), bool(cfg.cascade_teacher), stats.threshold if stats is not None else None
    )
    units = [cohort.unit_of(p) for p in kinds]

    def one(unit: cohort.Unit):
        groups, skipped = _score_input(scorer, unit.path, kinds[unit.path], log)
        heatmap = cfg.heatmap or bool(cfg.heatmap_classes)
        return (
            groups,
            skipped,
            files.write_groups_files(
                groups, names, cfg.out_dir, cfg.qupath_object_type, heatmap, cfg.heatmap_classes
            ),
        )

    share = cohort.Share(cfg.out_dir, cfg.task_index, cfg.num_tasks)
    cohort.run_share(share, units, fingerprint(cfg, run, mpp), columns, one)
    if cfg.num_tasks > 1:
        return {}
    return cohort.assemble(cfg.out_dir, units, columns, cfg.ood_warn_fraction)


# How slide tiles are read, in the fingerprint: an out_dir of predictions read another way
# (before levels at rounded sizes were read as their own pixels, kd_histo.evaluation.level_pixels)
# is not resumed with them.
SLIDE_READS = "level pixels where OpenSlide resamples"

# Fields of PredictConfig that do not change what is written (the rest are the fingerprint).
_NOT_SETTINGS = (
    "model_dir",
    "model",
    "inputs",
    "inputs_file",
    "out_dir",
    "num_workers",
    "task_index",
    "num_tasks",
)


def fingerprint(cfg: PredictConfig, run: RunRecord, mpp: float) -> dict:
    """What makes two runs' outputs the same: the model's (and a cascade teacher's) SHA-256, its
    run record and OOD statistics, and the resolved prediction settings."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_SETTINGS}
    if mpp:  # the µm/px slides are read at (0.0: no slides among the inputs), and how
        settings["read_mpp"] = mpp
        settings["slide_reads"] = SLIDE_READS
    settings["cascade_teacher"] = bool(cfg.cascade_teacher)
    settings["net_ops"] = NET_OPS
    from kd_histo.evaluation.export import EXPORT_JSON, TFLITE_FILE
    from kd_histo.evaluation.teachers import teacher_files

    where = cfg.network_dir
    exported = {  # an exported model's files (those that exist are hashed)
        "export_json": os.path.join(cfg.model, EXPORT_JSON),
        "saved_model": os.path.join(cfg.model, "saved_model.pb"),  # TensorFlow's fixed name
        "tflite": os.path.join(cfg.model, TFLITE_FILE),
    }
    return cohort.fingerprint(
        settings,
        **(exported if cfg.model else {"model": run.model_path(cfg.model_dir)}),
        run_json=os.path.join(where, RUN_JSON),
        ood=os.path.join(where, ood.OOD_FILE),
        **teacher_files(cfg.cascade_teacher),  # each member of a cascade's (ensemble) teacher
    )


def _score_input(
    scorer: _Scorer, path: str, kind: str, log: Callable[[str], None]
) -> tuple[list[ScoredGroup], list[tuple[str, str]]]:
    """One input's groups and the files skipped in it; a slide that cannot be read or predicted
    is skipped with the reason (the other inputs go on)."""
    skipped: list[tuple[str, str]] = []
    if kind == "shards":
        return scorer.shards(path, log), skipped
    if kind == "folder":
        groups = []
        for t in folder_tiles(path, scorer.run.hr_px, skipped):
            images = progress(t.images, desc=t.slide_id, unit="tiles")  # read as it goes
            groups.append(scorer.tiles(t, *scorer.hr_probs(images)))
        return groups, skipped
    import openslide

    from kd_histo.convert.errors import SkipInput

    try:
        cfg = scorer.cfg
        tiles = predict_slide(
            scorer.classify,
            path,
            scorer.run,
            mpp=scorer.mpp,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            min_tissue=cfg.min_tissue,
            max_tiles=cfg.max_tiles,
            slide_mpp=cfg.slide_mpp,
        )
        return [scorer.tiles(*tiles)], skipped
    except (ValueError, SkipInput, openslide.OpenSlideError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        reason = reason[len(path) + 2 :] if reason.startswith(f"{path}: ") else reason
        _LOG.warning(f"{path}: skipped: {reason}")
        return [], [(path, reason)]


class _Scorer:
    """The model (and the cascade's teacher) on each kind of input, as :class:`ScoredGroup`."""

    def __init__(self, model, run: RunRecord, cfg: PredictConfig, cascade, mpp: float):
        self.model, self.run, self.cfg, self.cascade, self.mpp = model, run, cfg, cascade, mpp
        self.exported = bool(cfg.model)  # an ExportedModel: probabilities only, no OOD score
        normalised = run.stain_reference is not None
        self.ood = None if self.exported else ood.load_for(cfg.model_dir, normalised)
        if self.ood is None and not self.exported:
            _LOG.info(ood.NO_STATS)
        # slides: tiles read at the model's input size; HR tiles in memory: the run's view
        self.classify = (
            model.classify if self.exported else slide_classifier(model, run.input_px, self.ood)
        )
        self.classify_hr = None if self.exported else hr_classifier(model, run, self.ood)
        if cascade is not None:  # (the teacher's compiled graph, its record)
            self.cascade = (hr_classifier(*cascade), cascade[1])

    def hr_probs(self, images: Iterator[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, out-of-domain features or None) of HR tiles in memory."""
        if self.exported:
            return self.model.hr_probs(images, self.cfg.batch_size)
        return classify_tiles(self.classify_hr, images, self.run, self.cfg.batch_size)

    def tiles(self, t: Tiles, probs: np.ndarray, embeddings: np.ndarray | None) -> ScoredGroup:
        """A slide's or folder group's tiles, re-scored by the cascade's teacher if there is one;
        the out-of-domain scores are the model's own (the student's in a cascade)."""
        scores = None
        if self.ood is not None and embeddings is not None:
            scores = self.ood.scores(embeddings)
        probs, mask = _cascade(probs, t.reread, self.cascade, self.cfg, t.slide_id)
        xy = t.xy or [(0, 0)] * len(probs)
        teacher = mask if self.cascade else None
        return ScoredGroup(t.slide_id, list(t.sources), list(xy), probs, teacher, t.grid, scores)

    def shards(self, path: str, log: Callable[[str], None]) -> list[ScoredGroup]:
        """A converted data folder's split, one group per run of tiles of one slide."""
        from kd_histo.data.pipeline import batch_tiles, make_dataset
        from kd_histo.evaluation import evaluate
        from kd_histo.schema import DatasetInfo

        cfg, run = self.cfg, self.run
        pipe = dataclasses.replace(
            run.pipeline_config(path, cfg.batch_size), skip_corrupt=cfg.skip_corrupt
        )
        ds = make_dataset(pipe, cfg.split, training=False)
        n = DatasetInfo.read(path).num_examples(cfg.split)
        ds = progress(ds, total=n, desc=f"{path} ({cfg.split})", unit="tiles", size=batch_tiles)
        keep = ("hr",) if self.cascade else ()
        # an exported model takes the uint8 HR tiles and makes the input view in its graph
        view, of = ("hr", self.model.hr_probs_of_float) if self.exported else (run.view, None)
        p, kept = evaluate.predict_split_keeping(self.model, ds, view, keep, of, self.ood)
        if cfg.skip_corrupt:
            stated = DatasetInfo.read(path).num_examples(cfg.split)
            log(
                f"--skip_corrupt: {stated - len(p.probs)} corrupt records skipped in {path} "
                f"({cfg.split})"
            )
        probs, mask = _cascade(p.probs, lambda idx: iter(kept["hr"][idx]), self.cascade, cfg, path)
        out, start = [], 0
        for end in range(1, len(probs) + 1):  # split where the slide id changes, order kept
            if end == len(probs) or p.slide_ids[end] != p.slide_ids[start]:
                out.append(
                    ScoredGroup(
                        str(p.slide_ids[start]),
                        [str(s) for s in p.sources[start:end]],
                        [(int(x), int(y)) for x, y in zip(p.x[start:end], p.y[start:end])],
                        probs[start:end],
                        mask[start:end] if self.cascade else None,
                        ood_scores=None if p.ood_scores is None else p.ood_scores[start:end],
                    )
                )
                start = end
        return out


def _cascade(
    probs: np.ndarray,
    hr_tiles: Callable[[np.ndarray], Iterator[np.ndarray]],
    cascade,
    cfg: PredictConfig,
    name: str,
) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's probabilities replace the student's on the selected tiles of one group; returns
    (probabilities, mask of the tiles the teacher scored)."""
    if cascade is None:
        return probs, np.zeros(len(probs), bool)
    from kd_histo.evaluation.cascade import combine, select

    teacher, teacher_run = cascade  # the teacher's compiled graph (hr_classifier)
    mask = select(probs, fraction=cfg.cascade_fraction, threshold=cfg.cascade_threshold)
    idx = np.flatnonzero(mask)
    _LOG.info(f"cascade: the teacher re-scores {len(idx)} of {len(probs)} tiles of {name}")
    if not len(idx):
        return probs, mask
    hr = progress(hr_tiles(idx), total=len(idx), desc=f"cascade {name}", unit="tiles")
    teacher_probs, _ = classify_tiles(teacher, hr, teacher_run, cfg.batch_size)
    return combine(probs, teacher_probs, mask), mask
