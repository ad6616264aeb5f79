"""A trained network on new data: tile folders, converted shards, or whole-slide images.

Tile folders and shards become tiles at the run's HR size (the run record's ``hr_px``) and the LR
view is made as in training (the record's factor and ``lr_method``, antialiased). Slides are tiled
on the grid of HR tiles at the record's µm/px of the training tiles (or ``target_mpp`` when given),
tissue tiles only, and each tile is read at the model's own resolution from the slide's pyramid
(``kd_histo.evaluation.slide_reader``: a student x8 reads the level at 8x the µm/px, never level 0;
a slide
without that level is shrunk from a finer one, with a note) by parallel reader threads, while the
model, one compiled graph, runs on the previous batch. The network's class probabilities are
written per tile (``predictions.csv``) and per slide (``slides.csv``: tile count, mean probability
per class, majority class). With ``heatmap`` each slide also gets ``heatmaps/<slide>.png``: the
probability of its top class over its thumbnail. Tiles from a folder are grouped into "slides" by
their parent folder; unreadable images are skipped and listed in ``skipped.csv``, as conversion
does.
With a cascade teacher (``cascade_teacher``) the teacher re-scores the student's least confident
tiles of each group (a slide, a folder group, a shards input) from their HR tiles, read again (from
a slide at the teacher's own level).

Not here: metrics against labels (``kd_histo.evaluation.evaluate``), training
(``kd_histo.training.train``).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator

import numpy as np

from kd_histo.convert.manifest import SLIDE_EXTENSIONS  # the slide types conversion reads, too
from kd_histo.convert.tiles import TILE_EXTENSIONS
from kd_histo.settings import SKIP_CORRUPT_HELP, setting
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
      target_mpp: µm/px of the HR tiles read from slides; 0 = the run record's ``mpp`` (the
        training tiles'), which must then be known.
      min_tissue: fraction of a slide tile that must be tissue.
      max_tiles: at most this many tiles per slide (evenly spaced); 0 = all.
      heatmap: write a heatmap per slide.
      num_workers: slides: reader threads, each with its own OpenSlide handle (0 = read in the
        thread that runs the model).
      cascade_teacher: a teacher run folder: the teacher re-scores the student's least confident
        tiles of each slide (tile folder group, shards input) from their HR tiles; "" = off.
      cascade_fraction: share of each group's tiles the teacher re-scores
      (``kd_histo.evaluation.cascade.select``).
      cascade_threshold: instead, the teacher re-scores tiles whose top probability is below this.
      skip_corrupt: converted data folders: skip corrupt records (and log how many).
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
    # Shared with kd-histo-convert (its default); here used only when given, else the run's µm/px.
    target_mpp: float = setting(
        0.0,
        "Slides: µm/px of the HR tiles. kd-histo-predict: only when given, to override the run's "
        "training tiles' µm/px (run.json), or when that is unknown.",
        flag_default=0.5,
        unset_is_default=True,
    )
    min_tissue: float = setting(0.5, "Slides: fraction of tissue a tile needs.")
    max_tiles: int = setting(0, "Slides: at most this many tiles per slide (0 = all).")
    heatmap: bool = setting(False, "Slides: write a probability heatmap over the thumbnail.")
    skip_corrupt: bool = setting(False, SKIP_CORRUPT_HELP)
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


@dataclasses.dataclass
class _Tiles:
    slide_id: str
    sources: list[str]  # folders: filled as the images are read (unreadable ones are skipped)
    xy: list[tuple[int, int]]  # folders: empty (every tile is (0, 0))
    images: Iterator[np.ndarray] | None  # uint8 [hr_px, hr_px, 3], lazily read; None for slides
    heat: dict | None = None  # slides: {"path", "size_l0"} to place tiles on the thumbnail
    reread: Callable[[np.ndarray], Iterator[np.ndarray]] | None = (
        None  # HR tiles by index (the cascade)
    )


def _kind(path: str) -> str:
    if os.path.isdir(path):
        return "shards" if os.path.isfile(os.path.join(path, "dataset.json")) else "folder"
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"input {path} not found; give tile folders, converted data folders or slide files"
        )
    ext = os.path.splitext(path)[1].lower()
    if ext in SLIDE_EXTENSIONS or ext in (".tif", ".tiff"):
        return "slide"
    raise ValueError(
        f"{path}: not a folder or a whole-slide image ({', '.join(SLIDE_EXTENSIONS)}, .tif)"
    )


def _folder_tiles(path: str, hr_px: int, skipped: list[tuple[str, str]]) -> list[_Tiles]:
    """Tiles of a folder, grouped by parent folder; unreadable images go to ``skipped`` as read."""
    groups: dict[str, list[str]] = {}
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            if os.path.splitext(f)[1].lower() in TILE_EXTENSIONS:
                groups.setdefault(os.path.relpath(root, path), []).append(os.path.join(root, f))
    if not groups:
        raise ValueError(f"{path} holds no tiles ({', '.join(TILE_EXTENSIONS)})")
    out = []
    for group, files in groups.items():
        slide_id = os.path.basename(os.path.normpath(path)) if group == "." else group
        kept: list[str] = []

        def reread(idx, kept=kept):
            return (_reread(kept[i], hr_px) for i in idx)

        out.append(
            _Tiles(slide_id, kept, [], _read_all(files, hr_px, kept, skipped), reread=reread)
        )
    return out


def _read_all(
    files: list[str], hr_px: int, kept: list[str], skipped: list[tuple[str, str]]
) -> Iterator[np.ndarray]:
    """The readable images of ``files`` at ``hr_px``, read as conversion does; others skipped."""
    from kd_histo.convert.errors import SkipInput
    from kd_histo.convert.tiles import fit_tile, read_tile

    for f in files:
        try:
            image = fit_tile(read_tile(f)[0], hr_px, mode="resize")
        except SkipInput as e:
            skipped.append((f, str(e)))
            continue
        kept.append(f)
        yield image


def _reread(path: str, hr_px: int) -> np.ndarray:
    """An image read before, again (the cascade's teacher); one line if it changed since."""
    from kd_histo.convert.errors import SkipInput
    from kd_histo.convert.tiles import fit_tile, read_tile

    try:
        return fit_tile(read_tile(path)[0], hr_px, mode="resize")
    except SkipInput as e:
        raise ValueError(f"{path}: {e} (it was readable a moment ago); rerun") from None


def tile_mpp(run: RunRecord, target_mpp: float) -> float:
    """µm/px at which slides are tiled into HR tiles: ``target_mpp`` if given, else the run's."""
    if target_mpp < 0 or not np.isfinite(target_mpp):
        raise ValueError(f"--target_mpp must be > 0 (or 0 = the run's), got {target_mpp}")
    if target_mpp:
        return target_mpp
    if run.mpp is None:
        raise ValueError(
            "the run's training tiles have no known µm/px (their dataset.json says 0); pass "
            "--target_mpp=<µm/px of the training tiles>"
        )
    return run.mpp


def _predict_slide(
    classify, path: str, run: RunRecord, cfg: PredictConfig, mpp: float
) -> tuple[_Tiles, np.ndarray]:
    """A slide's tissue tiles read at the model's own µm/px (``slide_reader``), classified."""
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
    out = []
    # the readers fill the next batches while the model runs on this one
    for batch in slide_reader.stream_batches(plan, cfg.batch_size, num_workers=cfg.num_workers):
        out.append(classify(batch).numpy())
        progress.update(len(batch))
    progress.close(
        f" (level {plan.level} at {plan.level_mpp:.3g} µm/px, {plan.read_px} px reads, "
        f"{plan.input_px} px model input)"
    )

    def reread(idx) -> Iterator[np.ndarray]:  # HR tiles for the cascade's teacher, at its own level
        hr = slide_reader.for_input(plan, run.hr_px, coords=[plan.coords[i] for i in idx])
        for batch in slide_reader.stream_batches(hr, cfg.batch_size, num_workers=cfg.num_workers):
            yield from batch

    tiles = _Tiles(
        sid,
        [path] * len(plan.coords),
        list(plan.coords),
        None,
        {"path": path, "size_l0": plan.size_l0},
        reread=reread,
    )
    return tiles, np.concatenate(out)


def _classifier(model):
    """Class probabilities of uint8 tiles at the model's input size, as one compiled graph."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def classify(images):
        logits = model(tf.cast(images, tf.float32) / 255.0, training=False)["logits"]
        return tf.nn.softmax(tf.cast(logits, tf.float32))

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


def _probs(model, images: Iterator[np.ndarray], run: RunRecord, batch_size: int) -> np.ndarray:
    import tensorflow as tf

    from kd_histo.data.views import resize

    out = []
    for b in _batched(images, batch_size):
        x = tf.convert_to_tensor(b, tf.float32) / 255.0
        if run.view == "lr":  # the LR view as training made it (the run's factor and method)
            x = resize(x, run.input_px, memory_lr_method(run))
        logits = model(x, training=False)["logits"]
        out.append(tf.nn.softmax(tf.cast(logits, tf.float32)).numpy())
    return np.concatenate(out) if out else np.zeros((0, run.num_classes), np.float32)


def predict(cfg: PredictConfig, log: Callable[[str], None] = lambda line: None) -> dict[str, str]:
    """Predicts every input; writes predictions.csv, slides.csv (and heatmaps); returns paths.

    ``log`` receives one line per converted data folder read with ``skip_corrupt``: how many
    corrupt records were skipped.
    """
    from kd_histo.data.pipeline import make_dataset
    from kd_histo.evaluation import evaluate
    from kd_histo.models import load_model
    from kd_histo.schema import DatasetInfo

    if not cfg.inputs:
        raise ValueError("no inputs; pass --inputs=<tile folder | data folder | slide file>,...")
    run = read_run_record(cfg.model_dir)
    names = list(run.class_names)
    kinds = [(p, _kind(p)) for p in cfg.inputs]  # all inputs checked before any work
    mpp = tile_mpp(run, cfg.target_mpp) if any(k == "slide" for _, k in kinds) else 0.0
    if run.lr_method == "pyramid" and any(k == "folder" for _, k in kinds):
        _LOG.warning(
            f"{cfg.model_dir} was trained on pyramid LR tiles; tile folders get an "
            "antialiased "
            "area resize of the HR tile instead (slides are read from their own pyramid level)"
        )
    model = load_model(run.model_path(cfg.model_dir), expected_num_classes=len(names))
    cascade = _load_cascade_teacher(cfg, run)  # None, or (teacher net, its record)
    os.makedirs(cfg.out_dir, exist_ok=True)
    rows, heat, skipped, scored_by = [], [], [], []
    classify = _classifier(model)
    for path, kind in kinds:
        if kind == "shards":
            pipe = dataclasses.replace(
                run.pipeline_config(path, cfg.batch_size), skip_corrupt=cfg.skip_corrupt
            )
            ds = make_dataset(pipe, cfg.split, training=False)
            p, kept = evaluate.predict_split_keeping(
                model, ds, run.view, keep=("hr",) if cascade else ()
            )
            if cfg.skip_corrupt:
                stated = DatasetInfo.read(path).num_examples(cfg.split)
                log(
                    f"--skip_corrupt: {stated - len(p.probs)} corrupt records skipped in {path} "
                    f"({cfg.split})"
                )
            probs, mask = _cascade(p.probs, lambda idx: iter(kept["hr"][idx]), cascade, cfg, path)
            rows += [
                (p.slide_ids[i], p.sources[i], int(p.x[i]), int(p.y[i]), probs[i])
                for i in range(len(probs))
            ]
            scored_by += [mask]
            continue
        if kind == "slide":
            groups = [_predict_slide(classify, path, run, cfg, mpp)]
        else:
            groups = (
                (t, _probs(model, t.images, run, cfg.batch_size))
                for t in _folder_tiles(path, run.hr_px, skipped)
            )
        for t, probs in groups:
            probs, mask = _cascade(probs, t.reread, cascade, cfg, t.slide_id)
            xy = t.xy or [(0, 0)] * len(probs)
            rows += [
                (t.slide_id, t.sources[i], xy[i][0], xy[i][1], probs[i]) for i in range(len(probs))
            ]
            scored_by += [mask]
            if cfg.heatmap and t.heat:
                heat.append((t, probs))
    paths = {}
    if skipped:  # as conversion does: skip unreadable images, list them with the reason
        paths["skipped"] = _write_skipped(skipped, os.path.join(cfg.out_dir, "skipped.csv"))
        _LOG.warning(
            f"skipped {len(skipped)} unreadable image(s), listed in {paths['skipped']} "
            f"(first: {skipped[0][0]}: {skipped[0][1]})"
        )
    if not rows:
        raise ValueError(
            f"no readable tile in {', '.join(cfg.inputs)}; see {paths.get('skipped', 'the inputs')}"
        )
    by = ["teacher" if m else "student" for m in np.concatenate(scored_by)] if cascade else None
    paths |= {
        "predictions": _write_tiles(rows, names, os.path.join(cfg.out_dir, "predictions.csv"), by),
        "slides": _write_slides(rows, names, os.path.join(cfg.out_dir, "slides.csv")),
    }
    for t, probs in heat:
        paths[f"heatmap:{t.slide_id}"] = _heatmap(
            t, probs, names, os.path.join(cfg.out_dir, "heatmaps")
        )
    return paths


def _write_skipped(skipped: list[tuple[str, str]], path: str) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "reason"])
        w.writerows(skipped)
    return path


def _load_cascade_teacher(cfg: PredictConfig, run: RunRecord):
    """(teacher net, teacher record) for ``cfg.cascade_teacher``, checked to fit the student."""
    if not cfg.cascade_teacher:
        return None
    from kd_histo.evaluation.cascade import check_pair
    from kd_histo.models import load_model

    teacher_run = read_run_record(cfg.cascade_teacher)
    check_pair(run, teacher_run)
    return load_model(
        teacher_run.model_path(cfg.cascade_teacher), expected_num_classes=run.num_classes
    ), teacher_run


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
    return combine(probs, _probs(teacher, hr_tiles(idx), teacher_run, cfg.batch_size), mask), mask


def _write_tiles(rows, names, path, scored_by: list[str] | None = None) -> str:
    """predictions.csv; with the cascade a last column says which net scored each tile."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["slide_id", "source", "x", "y", "pred", "pred_name"]
            + [f"prob_{c}" for c in names]
            + (["scored_by"] if scored_by else [])
        )
        for i, (sid, src, x, y, p) in enumerate(rows):
            k = int(np.argmax(p))
            w.writerow(
                [sid, src, x, y, k, names[k]]
                + [f"{v:.6f}" for v in p]
                + ([scored_by[i]] if scored_by else [])
            )
    return path


def _write_slides(rows, names, path) -> str:
    by: dict[str, list[np.ndarray]] = {}
    for sid, _, _, _, p in rows:
        by.setdefault(sid, []).append(p)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["slide_id", "n_tiles", "pred_mean", "pred_majority"]
            + [f"mean_prob_{c}" for c in names]
            + [f"frac_{c}" for c in names]
        )
        for sid, ps in by.items():
            ps = np.stack(ps)
            mean = ps.mean(0)
            frac = np.bincount(ps.argmax(1), minlength=len(names)) / len(ps)
            w.writerow(
                [sid, len(ps), names[int(mean.argmax())], names[int(frac.argmax())]]
                + [f"{v:.6f}" for v in mean]
                + [f"{v:.6f}" for v in frac]
            )
    return path


def _heatmap(t: _Tiles, probs: np.ndarray, names, out_dir: str) -> str:
    from kd_histo.convert import slides
    from kd_histo.evaluation import plots

    os.makedirs(out_dir, exist_ok=True)
    slide = slides.open_slide(t.heat["path"])
    try:
        width, height = slide.dimensions
        thumb = np.asarray(slide.get_thumbnail((1024, 1024)).convert("RGB"))
    finally:
        slide.close()
    size = t.heat["size_l0"]
    grid = np.full((max(1, height // size), max(1, width // size)), np.nan)
    top = int(probs.mean(0).argmax())
    for (x, y), p in zip(t.xy, probs):
        grid[y // size, x // size] = p[top]
    # the grid covers whole tiles only: crop the thumbnail to the same area so cells line up
    th = int(round(thumb.shape[0] * grid.shape[0] * size / height))
    tw = int(round(thumb.shape[1] * grid.shape[1] * size / width))
    return plots.heatmap_png(
        thumb[:th, :tw],
        grid,
        os.path.join(out_dir, f"{t.slide_id}.png"),
        title=f"{t.slide_id}: P({names[top]})",
    )
