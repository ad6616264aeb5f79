"""A trained network on new data: tile folders, converted shards, or whole-slide images.

Each input becomes tiles at the run's HR size (the run record's ``hr_px``; slides are tiled at the
record's µm/px of the training tiles, or ``target_mpp`` when given, with
``kd_histo.convert.slides``, tissue tiles only, one tile in memory per read), the LR view is made
as in training (the record's factor and ``lr_method``, antialiased), and
the network's class probabilities are written per tile (``predictions.csv``) and per slide
(``slides.csv``: tile count, mean probability per class, majority class). With ``heatmap`` each
slide also gets ``heatmaps/<slide>.png``: the probability of its top class over its thumbnail.
Tiles from a folder are grouped into "slides" by their parent folder.

Not here: metrics against labels (``kd_histo.evaluate``), training (``kd_histo.train``).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Iterator

import numpy as np

from kd_histo.convert.manifest import SLIDE_EXTENSIONS  # the slide types conversion reads, too
from kd_histo.convert.tiles import TILE_EXTENSIONS
from kd_histo.run_record import RunRecord, read_run_record


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
    """

    model_dir: str
    inputs: tuple[str, ...]
    out_dir: str = "predictions"
    split: str = "test"
    batch_size: int = 64
    target_mpp: float = 0.0
    min_tissue: float = 0.5
    max_tiles: int = 0
    heatmap: bool = False


@dataclasses.dataclass
class _Tiles:
    slide_id: str
    sources: list[str]
    xy: list[tuple[int, int]]
    images: Iterator[np.ndarray]  # uint8 [hr_px, hr_px, 3], lazily read
    heat: dict | None = None  # slides: {"path", "size_l0"} to place tiles on the thumbnail


def _kind(path: str) -> str:
    if os.path.isdir(path):
        return "shards" if os.path.isfile(os.path.join(path, "dataset.json")) else "folder"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input {path} not found; give tile folders, converted data folders or slide files")
    ext = os.path.splitext(path)[1].lower()
    if ext in SLIDE_EXTENSIONS or ext in (".tif", ".tiff"):
        return "slide"
    raise ValueError(f"{path}: not a folder or a whole-slide image ({', '.join(SLIDE_EXTENSIONS)}, .tif)")


def _folder_tiles(path: str, hr_px: int) -> list[_Tiles]:
    from kd_histo.convert.tiles import fit_tile

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
        images = (fit_tile(_read(f), hr_px, mode="resize") for f in files)
        out.append(_Tiles(slide_id, files, [(0, 0)] * len(files), images))
    return out


def _read(path: str) -> np.ndarray:
    from kd_histo.convert.errors import SkipInput
    from kd_histo.convert.tiles import read_tile

    try:
        return read_tile(path)[0]
    except SkipInput as e:
        raise ValueError(f"{path}: {e}; remove or fix the file") from None


def tile_mpp(run: RunRecord, target_mpp: float) -> float:
    """µm/px at which slides are tiled into HR tiles: ``target_mpp`` if given, else the run's."""
    if target_mpp < 0 or not np.isfinite(target_mpp):
        raise ValueError(f"--target_mpp must be > 0 (or 0 = the run's), got {target_mpp}")
    if target_mpp:
        return target_mpp
    if run.mpp is None:
        raise ValueError("the run's training tiles have no known µm/px (their dataset.json says 0); pass "
                         "--target_mpp=<µm/px of the training tiles>")
    return run.mpp


def _slide_tiles(path: str, hr_px: int, cfg: PredictConfig, mpp: float) -> _Tiles:
    from kd_histo.convert import slides

    from kd_histo.convert.errors import SkipInput

    try:
        plan = slides.plan_slide(path, hr_px, mpp, min_tissue=cfg.min_tissue)
    except SkipInput as e:  # SkipInput is not a ValueError: the binary's one-line error needs one
        raise ValueError(f"{path}: {e}") from None
    coords = list(plan.coords)
    if not coords:
        raise ValueError(f"{path}: no tile has {cfg.min_tissue:.0%} tissue; lower --min_tissue")
    if cfg.max_tiles and len(coords) > cfg.max_tiles:
        coords = [coords[i] for i in np.linspace(0, len(coords) - 1, cfg.max_tiles).round().astype(int)]

    def read() -> Iterator[np.ndarray]:
        slide = slides.open_slide(path)
        try:
            for x, y in coords:
                yield slides.read_region_rgb(slide, x, y, plan.size_l0, hr_px)
        finally:
            slide.close()

    sid = os.path.splitext(os.path.basename(path))[0]
    return _Tiles(sid, [path] * len(coords), coords, read(), {"path": path, "size_l0": plan.size_l0})


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
    return np.concatenate(out)


def predict(cfg: PredictConfig) -> dict[str, str]:
    """Predicts every input; writes predictions.csv, slides.csv (and heatmaps); returns paths."""
    from kd_histo import evaluate
    from kd_histo.data.pipeline import make_dataset
    from kd_histo.models import load_model

    if not cfg.inputs:
        raise ValueError("no inputs; pass --inputs=<tile folder | data folder | slide file>,...")
    run = read_run_record(cfg.model_dir)
    names = list(run.class_names)
    kinds = [(p, _kind(p)) for p in cfg.inputs]  # all inputs checked before any work
    mpp = tile_mpp(run, cfg.target_mpp) if any(k == "slide" for _, k in kinds) else 0.0
    if run.lr_method == "pyramid" and any(k != "shards" for _, k in kinds):
        print(f"kd_histo: {cfg.model_dir} was trained on pyramid LR tiles; tiles and slides here get an antialiased "
              "area resize of the HR tile instead", flush=True)
    model = load_model(run.model_path(cfg.model_dir), expected_num_classes=len(names))
    os.makedirs(cfg.out_dir, exist_ok=True)
    rows, heat = [], []
    for path, kind in kinds:
        if kind == "shards":
            ds = make_dataset(run.pipeline_config(path, cfg.batch_size), cfg.split, training=False)
            p = evaluate.predict_split(model, ds, run.view)
            rows += [(p.slide_ids[i], p.sources[i], int(p.x[i]), int(p.y[i]), p.probs[i]) for i in range(len(p.probs))]
            continue
        groups = _folder_tiles(path, run.hr_px) if kind == "folder" else [_slide_tiles(path, run.hr_px, cfg, mpp)]
        for t in groups:
            probs = _probs(model, t.images, run, cfg.batch_size)
            rows += [(t.slide_id, t.sources[i], t.xy[i][0], t.xy[i][1], probs[i]) for i in range(len(probs))]
            if cfg.heatmap and t.heat:
                heat.append((t, probs))
    paths = {"predictions": _write_tiles(rows, names, os.path.join(cfg.out_dir, "predictions.csv")),
             "slides": _write_slides(rows, names, os.path.join(cfg.out_dir, "slides.csv"))}
    for t, probs in heat:
        paths[f"heatmap:{t.slide_id}"] = _heatmap(t, probs, names, os.path.join(cfg.out_dir, "heatmaps"))
    return paths


def _write_tiles(rows, names, path) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "source", "x", "y", "pred", "pred_name"] + [f"prob_{c}" for c in names])
        for sid, src, x, y, p in rows:
            k = int(np.argmax(p))
            w.writerow([sid, src, x, y, k, names[k]] + [f"{v:.6f}" for v in p])
    return path


def _write_slides(rows, names, path) -> str:
    by: dict[str, list[np.ndarray]] = {}
    for sid, _, _, _, p in rows:
        by.setdefault(sid, []).append(p)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "n_tiles", "pred_mean", "pred_majority"] + [f"mean_prob_{c}" for c in names]
                   + [f"frac_{c}" for c in names])
        for sid, ps in by.items():
            ps = np.stack(ps)
            mean = ps.mean(0)
            frac = np.bincount(ps.argmax(1), minlength=len(names)) / len(ps)
            w.writerow([sid, len(ps), names[int(mean.argmax())], names[int(frac.argmax())]]
                       + [f"{v:.6f}" for v in mean] + [f"{v:.6f}" for v in frac])
    return path


def _heatmap(t: _Tiles, probs: np.ndarray, names, out_dir: str) -> str:
    from kd_histo import plots
    from kd_histo.convert import slides

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
    return plots.heatmap_png(thumb[:th, :tw], grid, os.path.join(out_dir, f"{t.slide_id}.png"),
                             title=f"{t.slide_id}: P({names[top]})")
