"""The test sets of the domain-shift measurements and how one trained net is measured on them.

- :func:`write_shifted_split`: a converted data set's test split, each tile re-coloured by a
  :class:`kd_histo.data.shifts.ShiftSpec`, written as shards of the same schema beside the data
  (``<data_dir>_<shift>``), so ``kd-histo-evaluate --data_dir=...`` measures any run on it.
- :func:`write_nct_probe`: the 9 NCT-CRC-HE tiles (224 px, 0.5 µm/px) as 112 px tiles in two
  folders: ``crop_0.5um`` (the 4 quarters of each, native resolution) and ``resized_1um`` (each
  tile shrunk to 112 px: 1 µm/px, the scale the CMU slide is read at): 45 tiles.
- :func:`measure_labeled`, :func:`measure_probe`, :func:`measure_cost`: one net's rows.

Not here: the plan and the loop (:mod:`kd_histo.protocol.domain_shift`), the table
(:mod:`kd_histo.protocol.domain_report`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shlex
import time

import numpy as np
from PIL import Image

from kd_histo import schema
from kd_histo.data import shifts
from kd_histo.protocol.domain_report import ShiftRow

DONE = "dataset.json"  # written last: a folder with it is complete


def shifted_dir(data_dir: str, shift: str) -> str:
    return f"{os.path.normpath(data_dir)}_{shift}"


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _shifted_record(serialized: bytes, spec: shifts.ShiftSpec) -> bytes:
    ex = schema.parse_example_numpy(serialized)
    rgb = np.asarray(Image.open(io.BytesIO(ex["image"])).convert("RGB"))
    fields = {
        k: ex[k].decode() if isinstance(ex[k], bytes) else ex[k]
        for k in ("label", "slide_id", "patient_id", "x", "y", "mpp", "source")
    }
    lr = ex["lr_image"]
    if lr:
        lr = _png(shifts.apply(spec, np.asarray(Image.open(io.BytesIO(lr)).convert("RGB"))))
    return schema.make_example(
        _png(shifts.apply(spec, rgb)),
        rgb.shape[0],
        rgb.shape[1],
        lr_image=lr,
        lr_factor=ex["lr_factor"],
        **fields,
    ).SerializeToString()


def write_shifted_split(
    data_dir: str, spec: shifts.ShiftSpec, split: str = "test", log=print
) -> str:
    """``<data_dir>_<spec.name>``: ``split`` of ``data_dir`` shifted by ``spec`` (PNG, one shard);
    kept when complete (its dataset.json is written last)."""
    from kd_histo.convert.writer import read_records, write_records_atomic

    out = shifted_dir(data_dir, spec.name)
    if os.path.isfile(os.path.join(out, DONE)):
        return out
    info = schema.DatasetInfo.read(data_dir)
    log(f"writing {out}: the {split} tiles of {data_dir}, {spec.describe()}")
    os.makedirs(out, exist_ok=True)
    records = (
        _shifted_record(rec, spec)
        for path in schema.shard_paths(data_dir, split)
        for rec in read_records(path, info.compression)
    )
    n = write_records_atomic(os.path.join(out, schema.shard_name(split, 0, 1)), records)
    if n != info.num_examples(split):
        raise ValueError(f"{data_dir}: read {n} {split} tiles, dataset.json says more; reconvert")
    dataclasses.replace(
        info,
        counts={split: info.counts[split]},
        shards={split: 1},
        compression="",
        image_format="png",
        source=f"{data_dir} ({split}), re-coloured",
        command="kd_histo.protocol.domain_probes.write_shifted_split",
        notes=[*info.notes, f"shift {spec.name}: {spec.describe()}"],
    ).write(out)
    return out


def write_nct_probe(nct_dir: str, out: str, tile_px: int = 112) -> tuple[str, int]:
    """The NCT tiles as ``tile_px`` tiles in ``out``/crop_0.5um and ``out``/resized_1um; returns
    (out, how many tiles)."""
    from kd_histo.data.stain_norm import reference_images

    n = 0
    for f in reference_images(nct_dir):
        with Image.open(f) as im:
            rgb = np.asarray(im.convert("RGB"))
        stem = os.path.splitext(os.path.basename(f))[0]
        h, w = rgb.shape[:2]
        tiles = {
            f"crop_0.5um/{stem}_{i}{j}.png": rgb[y : y + tile_px, x : x + tile_px]
            for i, y in enumerate(range(0, h - tile_px + 1, tile_px))
            for j, x in enumerate(range(0, w - tile_px + 1, tile_px))
        }
        small = Image.fromarray(rgb).resize((tile_px, tile_px), Image.Resampling.BOX)
        tiles[f"resized_1um/{stem}.png"] = np.asarray(small)
        for rel, tile in tiles.items():
            path = os.path.join(out, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if not os.path.isfile(path):
                Image.fromarray(tile).save(path)
            n += 1
    return out, n


def _cmd(*parts: str) -> str:
    return shlex.join(parts)


def _ood_format(model_dir: str) -> int:
    """The format of the score a row of ``model_dir`` is measured with (this kd_histo's for a run
    without statistics: its rows have no flagged share to be stale)."""
    from kd_histo.models import ood

    found = ood.file_format(model_dir)
    return ood.FORMAT if found is None else found


def measure_labeled(model_dir, data_dir, test_set, seed, setting, net, out_dir) -> ShiftRow:
    """A net's accuracy and flagged share on a labeled test split (``kd-histo-evaluate``)."""
    from kd_histo.evaluation import evaluate

    metrics = os.path.join(out_dir, evaluate.METRICS_JSON)
    if not os.path.isfile(metrics):
        cfg = evaluate.EvalConfig(model_dir, "test", data_dir=data_dir, out_dir=out_dir, n_boot=200)
        evaluate.evaluate_run(cfg)
    with open(metrics) as f:
        m = json.load(f)
    ood = m.get("ood") or {}
    return ShiftRow(
        seed,
        setting,
        net,
        test_set,
        n=int(m["tile"]["n"]),
        accuracy=float(m["tile"]["accuracy"]),
        ood_flagged=float(ood.get("flagged_fraction", np.nan)),
        ood_threshold=float(ood.get("threshold", np.nan)),
        ood_format=_ood_format(model_dir),
        command=_cmd(
            "kd-histo-evaluate",
            f"--model_dir={model_dir}",
            f"--data_dir={data_dir}",
            "--split=test",
            f"--out_dir={out_dir}",
        ),
    )


def measure_probe(model_dir, inputs, test_set, seed, setting, net, out_dir, read_mpp) -> ShiftRow:
    """A net's flagged share on unlabeled tiles (a tile folder or a slide, ``kd-histo-predict``)."""
    from kd_histo.evaluation import predict
    from kd_histo.models import ood

    preds = os.path.join(out_dir, "predictions.csv")
    if not os.path.isfile(preds):
        cfg = predict.PredictConfig(
            model_dir, (inputs,), out_dir=out_dir, read_mpp=read_mpp, num_workers=0
        )
        predict.predict(cfg)
    with open(preds, newline="") as f:
        flags = [int(r["ood_flag"]) for r in csv.DictReader(f)]
    stats = ood.OODStats.load(model_dir)
    return ShiftRow(
        seed,
        setting,
        net,
        test_set,
        n=len(flags),
        ood_flagged=float(np.mean(flags)) if flags else np.nan,
        ood_threshold=stats.threshold if stats else np.nan,
        ood_format=_ood_format(model_dir),
        command=_cmd(
            "kd-histo-predict",
            f"--model_dir={model_dir}",
            f"--inputs={inputs}",
            f"--read_mpp={read_mpp:g}",
            f"--out_dir={out_dir}",
        ),
    )


def measure_cost(model_dir, data_dir, seed, setting, net, repeats, command) -> ShiftRow:
    """Median process CPU time of one pass over the test tiles (the net's view, held in memory,
    batch 64) without and with the out-of-domain score, both traced per tile size (the same
    graph but for the score); each batch is timed both ways in turn (alternating which goes
    first), so a machine's changing load falls on both alike. CPU time, not wall clock: other
    processes' load does not count (a wall-clock reading once gave a Reinhard student's score a
    cost of -13.6%)."""
    from kd_histo.data.pipeline import make_dataset
    from kd_histo.evaluation import evaluate, ood_report
    from kd_histo.models import load_model, ood
    from kd_histo.training.run_record import read_run_record

    run = read_run_record(model_dir)
    model = load_model(run.model_path(model_dir))
    stats = ood.OODStats.load(model_dir)
    ds = make_dataset(run.pipeline_config(data_dir, 64), "test", training=False)
    batches = [b[run.view].numpy() for b in ds]
    plain = evaluate.probs_function(model)
    both = ood_report.probs_and_ood_function(model, stats)
    times = {"plain": [], "ood": []}
    for fn in (plain, both):  # warm-up: traced once
        fn(batches[0])
    for r in range(repeats):  # batch by batch, in alternating order: load drift cancels
        spent = {"plain": 0.0, "ood": 0.0}
        for i, b in enumerate(batches):
            pair = [("plain", plain), ("ood", both)]
            for name, fn in pair if (r + i) % 2 == 0 else pair[::-1]:
                t0 = time.process_time()
                fn(b)
                spent[name] += time.process_time() - t0
        for name, t in spent.items():
            times[name].append(t)
    return ShiftRow(
        seed,
        setting,
        net,
        "ood_cost",
        n=sum(len(b) for b in batches),
        seconds_plain=float(np.median(times["plain"])),
        seconds_ood=float(np.median(times["ood"])),
        ood_threshold=stats.threshold,
        ood_format=_ood_format(model_dir),
        command=command,
    )
