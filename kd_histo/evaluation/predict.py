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

from kd_histo.evaluation.predict_inputs import Tiles, folder_tiles, input_kind
from kd_histo.evaluation.prediction_files import ScoredGroup
from kd_histo.evaluation.qupath_out import OBJECT_TYPES, SlideGrid
from kd_histo.models import ood
from kd_histo.settings import OOD_WARN_HELP, SKIP_CORRUPT_HELP, setting
from kd_histo.training.run_record import RunRecord, read_run_record

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """What to predict and where to write.

    Attributes:
      model_dir: run folder (run.json + model.keras).
      inputs: tile folders, converted data folders (dataset.json), or slide files (``.svs`` ... and
        pyramidal ``.tif`` given as a file).
      out_dir: output folder.
      split: split read from a converted data folder.
      batch_size: tiles per forward pass.
      read_mpp: µm/px at which slides are read into HR tiles; 0 = the run record's ``mpp`` (the
        training tiles'), which must then be known.
      min_tissue: fraction of a slide tile that must be tissue.
      max_tiles: at most this many tiles per slide (evenly spaced); 0 = all.
      heatmap: write a heatmap per slide.
      heatmap_classes: draw one heatmap per class named here (implies ``heatmap``); empty = one,
        of the class with the highest mean probability.
      qupath_object_type: QuPath object type of the tiles in ``<slide>.geojson``.
      num_workers: slides: reader threads, each with its own OpenSlide handle (0 = read in the
        thread that runs the model).
      cascade_teacher: a teacher run folder: the teacher re-scores the student's least confident
        tiles of each slide (tile folder group, shards input) from their HR tiles; "" = off.
      cascade_fraction: share of each group's tiles the teacher re-scores
      (``kd_histo.evaluation.cascade.select``).
      cascade_threshold: instead, the teacher re-scores tiles whose top probability is below this.
      skip_corrupt: converted data folders: skip corrupt records (and log how many).
      ood_warn_fraction: a slide with more of its tiles out of the model's domain gets a warning
        (runs with ``ood.npz``; the scores are in predictions.csv, the shares in slides.csv).
    """

    model_dir: str = setting(help="Run folder of the model (run.json + model.keras).")
    inputs: tuple[str, ...] = setting(
        help="Tile folders, converted data folders, or whole-slide image files."
    )
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
        "Teacher run folder: it re-scores the student's least confident "
        "tiles at high resolution (with --cascade_fraction or --cascade_threshold).",
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

    def __post_init__(self):
        given = (self.cascade_fraction is not None) + (self.cascade_threshold is not None)
        if self.cascade_teacher and given != 1:
            raise ValueError(
                "--cascade_teacher needs one of --cascade_fraction=F or --cascade_threshold=P"
            )
        if not self.cascade_teacher and given:
            raise ValueError(
                "--cascade_fraction/--cascade_threshold need --cascade_teacher=<teacher run folder>"
            )


def tile_mpp(run: RunRecord, read_mpp: float) -> float:
    """µm/px at which slides are tiled into HR tiles: ``read_mpp`` if given, else the run's."""
    if read_mpp < 0 or not np.isfinite(read_mpp):
        raise ValueError(f"--read_mpp must be > 0 (or 0 = the run's), got {read_mpp}")
    if read_mpp:
        return read_mpp
    if run.mpp is None:
        raise ValueError(
            "the run's training tiles have no known µm/px (their dataset.json says 0); pass "
            "--read_mpp=<µm/px of the training tiles>"
        )
    return run.mpp


def _predict_slide(
    classify, path: str, run: RunRecord, cfg: PredictConfig, mpp: float
) -> tuple[Tiles, np.ndarray, np.ndarray]:
    """A slide's tissue tiles read at the model's own µm/px (``slide_reader``), classified:
    (tiles, probabilities, pooled embeddings)."""
    from kd_histo.evaluation import slide_reader

    plan = slide_reader.plan_read(
        path,
        hr_px=run.hr_px,
        hr_mpp=mpp,
        input_px=run.input_px,
        method=memory_lr_method(run),
        min_tissue=cfg.min_tissue,
        max_tiles=cfg.max_tiles,
    )
    if plan.note:
        _LOG.info(plan.note)
    sid = os.path.splitext(os.path.basename(path))[0]
    progress = slide_reader.Progress(sid, len(plan.coords))
    out, emb = [], []
    # the readers fill the next batches while the model runs on this one
    for batch in slide_reader.stream_batches(plan, cfg.batch_size, num_workers=cfg.num_workers):
        probs, pooled = classify(batch)
        out.append(probs.numpy())
        emb.append(pooled.numpy())
        progress.update(len(batch))
    progress.close(
        f" (level {plan.level} at {plan.level_mpp:.3g} µm/px, {plan.read_px} px reads, "
        f"{plan.input_px} px model input)"
    )

    def reread(idx) -> Iterator[np.ndarray]:  # HR tiles for the cascade's teacher, at its own level
        hr = slide_reader.for_input(plan, run.hr_px, coords=[plan.coords[i] for i in idx])
        for batch in slide_reader.stream_batches(hr, cfg.batch_size, num_workers=cfg.num_workers):
            yield from batch

    from kd_histo.convert import slides

    slide = slides.open_slide(path)  # readable a moment ago (plan_read opened it)
    try:
        width, height = slide.dimensions
    finally:
        slide.close()
    grid = SlideGrid(path, plan.size_l0, plan.base_mpp, width, height)
    tiles = Tiles(sid, [path] * len(plan.coords), list(plan.coords), None, grid=grid, reread=reread)
    return tiles, np.concatenate(out), np.concatenate(emb)


def _classifier(model):
    """(class probabilities, pooled last feature map) of uint8 tiles at the model's input size,
    as one compiled graph (the embedding is what the out-of-domain score reads)."""
    import tensorflow as tf

    from kd_histo.evaluation.ood_report import probs_and_embedding

    @tf.function(reduce_retracing=True)
    def classify(images):
        return probs_and_embedding(model(tf.cast(images, tf.float32) / 255.0, training=False))

    return classify


def _batched(images: Iterator[np.ndarray], n: int) -> Iterator[np.ndarray]:
    batch = []
    for im in images:
        batch.append(im)
        if len(batch) == n:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def memory_lr_method(run: RunRecord) -> str:
    """How an LR view is made from HR tiles in memory: the run's ``lr_method``; "area" for a
    "pyramid" run (no stored pyramid tile here: the nearest antialiased resize, as conversion's
    pyramid-free fallback)."""
    return "area" if run.lr_method == "pyramid" else run.lr_method


def _probs(
    model, images: Iterator[np.ndarray], run: RunRecord, batch_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities, pooled embeddings) of HR tiles in memory, through the run's view."""
    import tensorflow as tf

    from kd_histo.data.views import resize
    from kd_histo.evaluation.ood_report import probs_and_embedding

    out, emb = [], []
    for b in _batched(images, batch_size):
        x = tf.convert_to_tensor(b, tf.float32) / 255.0
        if run.view == "lr":  # the LR view as training made it (the run's factor and method)
            x = resize(x, run.input_px, memory_lr_method(run))
        probs, pooled = probs_and_embedding(model(x, training=False))
        out.append(probs.numpy())
        emb.append(pooled.numpy())
    if not out:
        return np.zeros((0, run.num_classes), np.float32), None
    return np.concatenate(out), np.concatenate(emb)


def predict(cfg: PredictConfig, log: Callable[[str], None] = lambda line: None) -> dict[str, str]:
    """Predicts every input; writes the files of ``kd_histo.evaluation.prediction_files``.

    ``log`` receives one line per converted data folder read with ``skip_corrupt``: how many
    corrupt records were skipped.

    Returns:
      {name: path} of the files written ("predictions", "slides", "geojson:<slide>"...).
    """
    from kd_histo.evaluation.heatmap import check_classes
    from kd_histo.models import load_model

    if not cfg.inputs:
        raise ValueError("no inputs; pass --inputs=<tile folder | data folder | slide file>,...")
    run = read_run_record(cfg.model_dir)
    names = list(run.class_names)
    check_classes(names, cfg.heatmap_classes)
    kinds = [(p, input_kind(p)) for p in cfg.inputs]  # all inputs checked before any work
    mpp = tile_mpp(run, cfg.read_mpp) if any(k == "slide" for _, k in kinds) else 0.0
    if run.lr_method == "pyramid" and any(k == "folder" for _, k in kinds):
        _LOG.warning(
            f"{cfg.model_dir} was trained on pyramid LR tiles; tile folders get an "
            "antialiased area resize of the HR tile instead (slides are read from their own "
            "pyramid level)"
        )
    model = load_model(run.model_path(cfg.model_dir), expected_num_classes=len(names))
    scorer = _Scorer(model, run, cfg, _load_cascade_teacher(cfg, run), mpp)
    os.makedirs(cfg.out_dir, exist_ok=True)
    groups: list[ScoredGroup] = []
    skipped: list[tuple[str, str]] = []
    for path, kind in kinds:
        if kind == "shards":
            groups += scorer.shards(path, log)
        elif kind == "slide":
            groups.append(scorer.tiles(*_predict_slide(scorer.classify, path, run, cfg, mpp)))
        else:
            for t in folder_tiles(path, run.hr_px, skipped):
                groups.append(scorer.tiles(t, *_probs(model, t.images, run, cfg.batch_size)))
    return _write_outputs(cfg, names, groups, skipped, scorer.ood)


class _Scorer:
    """The model (and the cascade's teacher) on each kind of input, as :class:`ScoredGroup`."""

    def __init__(self, model, run: RunRecord, cfg: PredictConfig, cascade, mpp: float):
        self.model, self.run, self.cfg, self.cascade, self.mpp = model, run, cfg, cascade, mpp
        self.classify = _classifier(model)
        self.ood = ood.OODStats.load(cfg.model_dir)
        if self.ood is None:
            _LOG.info(ood.NO_STATS)

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
        from kd_histo.data.pipeline import make_dataset
        from kd_histo.evaluation import evaluate
        from kd_histo.schema import DatasetInfo

        cfg, run = self.cfg, self.run
        pipe = dataclasses.replace(
            run.pipeline_config(path, cfg.batch_size), skip_corrupt=cfg.skip_corrupt
        )
        ds = make_dataset(pipe, cfg.split, training=False)
        p, kept = evaluate.predict_split_keeping(
            self.model, ds, run.view, keep=("hr",) if self.cascade else (), ood_stats=self.ood
        )
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


def _write_outputs(
    cfg: PredictConfig,
    names: list[str],
    groups: list[ScoredGroup],
    skipped: list[tuple[str, str]],
    stats: ood.OODStats | None = None,
) -> dict[str, str]:
    """The tables, then each slide's GeoJSON, OME-TIFF and heatmaps; {name: path}."""
    from kd_histo.evaluation import prediction_files as files

    paths = {}
    if skipped:  # as conversion does: skip unreadable images, list them with the reason
        paths["skipped"] = files.write_skipped(skipped, os.path.join(cfg.out_dir, "skipped.csv"))
        _LOG.warning(
            f"skipped {len(skipped)} unreadable image(s), listed in {paths['skipped']} "
            f"(first: {skipped[0][0]}: {skipped[0][1]})"
        )
    if not any(len(g.probs) for g in groups):
        raise ValueError(
            f"no readable tile in {', '.join(cfg.inputs)}; see {paths.get('skipped', 'the inputs')}"
        )
    threshold = stats.threshold if stats is not None else None
    paths["predictions"] = files.write_tiles(
        groups, names, os.path.join(cfg.out_dir, "predictions.csv"), threshold
    )
    paths["slides"] = files.write_slides(
        groups, names, os.path.join(cfg.out_dir, "slides.csv"), threshold
    )
    if threshold is not None:
        for line in files.ood_warnings(groups, threshold, cfg.ood_warn_fraction):
            _LOG.warning(line)
    for g in groups:
        if g.grid is not None:
            paths |= files.write_slide_files(
                g,
                names,
                cfg.out_dir,
                object_type=cfg.qupath_object_type,
                heatmap=cfg.heatmap or bool(cfg.heatmap_classes),
                heatmap_classes=cfg.heatmap_classes,
            )
    return paths


def _load_cascade_teacher(cfg: PredictConfig, run: RunRecord):
    """(teacher net, teacher record) for ``cfg.cascade_teacher``, checked to fit the student;
    several runs, comma-separated, are one ensemble (:mod:`kd_histo.evaluation.teachers`)."""
    if not cfg.cascade_teacher:
        return None
    from kd_histo.evaluation.teachers import check_teacher_runs, load_cascade_teacher

    records = check_teacher_runs(cfg.cascade_teacher, run)
    teacher = load_cascade_teacher(cfg.cascade_teacher, records, run.num_classes, cost=False)
    return teacher.model, records[0]


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

    teacher, teacher_run = cascade
    mask = select(probs, fraction=cfg.cascade_fraction, threshold=cfg.cascade_threshold)
    idx = np.flatnonzero(mask)
    _LOG.info(f"cascade: the teacher re-scores {len(idx)} of {len(probs)} tiles of {name}")
    if not len(idx):
        return probs, mask
    teacher_probs, _ = _probs(teacher, hr_tiles(idx), teacher_run, cfg.batch_size)
    return combine(probs, teacher_probs, mask), mask
