"""kd-histo-convert --input_dir=<class folders> --out_dir=<data dir> --tile_px=224

Converts tile folders, CSV manifests and whole-slide images into sharded TFRecords + dataset.json.

  kd-histo-convert --manifest=tiles/manifest.csv --out_dir=data --tile_px=64
  kd-histo-convert --input_dir=lc25000_lung --group_by=near_duplicates --out_dir=data
  kd-histo-convert --input_dir=tiles --groups=tiles/groups.csv --out_dir=data  # path,group_id
  kd-histo-convert --slides=slides/ --slide_labels=labels.csv --target_mpp=0.5 --lr_factor=4 \\
      --out_dir=data
  # many machines: each runs its task, then one merges
  kd-histo-convert ... --task_index=$SLURM_ARRAY_TASK_ID --num_tasks=8
  kd-histo-convert ... --num_tasks=8 --merge

Bad input ends in one line, ``kd-histo-convert: error: <what to fix>``, and exit status 2 (the
shared handling of ``kd_histo.cli.flags_common``), never in a traceback.
"""

from __future__ import annotations

import shlex
import sys

from kd_histo.cli import flags_common as fc  # first: it sets TensorFlow's log level
from kd_histo.convert import (
    ConversionError,
    ConvertConfig,
    EncodeOptions,
    convert,
    merge,
    run_task,
)

PROG = "kd-histo-convert"
FLAGS = fc.FLAGS


def define_flags() -> None:
    """Defines this binary's flags (at import of this module; shared names keep one default)."""
    d = fc._define  # the project's idempotent definer: several binaries may share one process
    d("string", "out_dir", "", "Output folder for shards and dataset.json (required).")
    d("string", "input_dir", "", "Folder of class subfolders (unlabeled/ = unlabeled tiles).")
    d(
        "string",
        "manifest",
        "",
        "CSV: path,label[,slide_id][,patient_id][,split]; empty label = unlabeled.",
    )
    d(
        "list",
        "slides",
        [],
        "Whole-slide files, folders or globs (unlabeled unless in --slide_labels).",
    )
    d("string", "slide_labels", "", "CSV of slides: path,label[,slide_id][,patient_id][,split].")
    d(
        "string",
        "h5_images",
        "",
        "HDF5 file of uint8 patches [N,H,W,3] (e.g. PatchCamelyon *_x.h5).",
    )
    d("string", "h5_labels", "", "HDF5 file of their labels (e.g. *_y.h5); '' = unlabeled.")
    d("string", "h5_key", "x", "Dataset name of the patches in --h5_images.")
    d("string", "h5_labels_key", "y", "Dataset name of the labels in --h5_labels.")
    d("string", "root", "", "If set, manifest paths must lie inside this folder.")
    d("list", "class_names", [], "Class order (default: sorted label names).")
    d(
        "enum",
        "group_by",
        "slide",
        "Groups kept in one split: slide ids as given (manifest slide_id, --groups), augmented "
        "copies of one original (near_duplicates: rotations, flips, zooms, crops, colour shifts), "
        "or a cheaper perceptual hash that misses arbitrary rotations and crops (phash).",
        enum_values=["slide", "near_duplicates", "phash"],
    )
    d(
        "string",
        "groups",
        "",
        "CSV path,group_id: tiles of one group (original image, slide, patient) share a split.",
    )
    d(
        "bool",
        "leakage_check",
        True,
        "Count val/test tiles with a near-copy in train (printed, and a note in dataset.json); "
        "free with --group_by=near_duplicates, which always reports it.",
    )
    d("integer", "phash_distance", 8, "Bits (of 64) within which two tiles count as near-copies.")
    d(
        "list",
        "split_fractions",
        ["0.7", "0.15", "0.15"],
        "train,val,test shares; a 4th share holds labeled groups out without labels in "
        "'unlabeled' (a label-scarce setting for distillation experiments).",
    )
    d("integer", "seed", 0, "Split seed.")
    d("integer", "tile_px", 224, "Side of the stored tiles in pixels.")
    d(
        "enum",
        "fit",
        "crop",
        "Tile images of another size: centre-crop or resize.",
        enum_values=["crop", "resize"],
    )
    d(
        "enum",
        "image_format",
        "png",
        "PNG is lossless; JPEG with --jpeg_quality.",
        enum_values=["png", "jpeg"],
    )
    d("integer", "jpeg_quality", 95, "JPEG quality (1-100).")
    d("integer", "png_level", 6, "PNG zlib level (0-9); lossless at every level.")
    d("integer", "max_pixels", 100_000_000, "Larger tile images are refused (decompression bombs).")
    d(
        "enum",
        "tiff_decoder",
        "pil",
        "Decode .tif tiles with Pillow or tensorflow-io.",
        enum_values=["pil", "tfio"],
    )
    d("float", "tile_mpp", 0.0, "µm/px of tile images when known (recorded; 0 = unknown).")
    d("float", "target_mpp", 0.5, "µm/px of slide tiles.")
    d("float", "target_mag", 0.0, "Instead of --target_mpp: magnification, 10x = 1.0 µm/px.")
    d("float", "slide_mpp", 0.0, "Level-0 µm/px for slides whose metadata lacks it.")
    d("integer", "lr_factor", 0, "Also store the aligned LR slide tile, tile_px/lr_factor wide.")
    d("float", "min_tissue", 0.5, "Fraction of tissue a slide tile needs to be kept.")
    d("bool", "strict", False, "Fail on the first unreadable input instead of skipping it.")
    d("enum", "compression", "", "Shard compression.", enum_values=["", "GZIP"])
    d("integer", "examples_per_shard", 1000, "Target shard size (when --num_shards=0).")
    d("integer", "num_shards", 0, "Shards per split (0 = from --examples_per_shard).")
    d("integer", "unit_size", 64, "Tiles per work unit: the granularity of resume and progress.")
    d("integer", "num_workers", 2, "Worker processes (0 = in this process).")
    d("integer", "task_index", 0, "This task among --num_tasks (Slurm/Kubernetes array index).")
    d("integer", "num_tasks", 1, "Independent tasks; with > 1, finish with --merge.")
    d("bool", "merge", False, "Only merge the finished tasks' parts into shards + dataset.json.")
    d("bool", "overwrite", False, "Replace a data set already in --out_dir.")
    d("bool", "keep_parts", False, "Keep <out_dir>/.parts after the merge.")
    d("bool", "progress", True, "Progress bar on stderr.")


def config_from_flags() -> ConvertConfig:
    """Turns the parsed flags into a ConvertConfig (raises ConversionError on bad values)."""
    if not FLAGS.out_dir:
        raise ConversionError(
            "--out_dir is required: the folder to write shards and dataset.json to"
        )
    try:
        fractions = tuple(float(x) for x in FLAGS.split_fractions)
    except ValueError:
        raise ConversionError(
            f"--split_fractions must be numbers, got {FLAGS.split_fractions}"
        ) from None
    if len(fractions) not in (3, 4):
        raise ConversionError(
            "--split_fractions needs train,val,test[,unlabeled] (3 or 4 numbers), "
            f"got {FLAGS.split_fractions}"
        )
    target_mpp = 10.0 / FLAGS.target_mag if FLAGS.target_mag > 0 else FLAGS.target_mpp
    encode = EncodeOptions(
        tile_px=FLAGS.tile_px,
        fit=FLAGS.fit,
        image_format=FLAGS.image_format,
        jpeg_quality=FLAGS.jpeg_quality,
        png_level=FLAGS.png_level,
        max_pixels=FLAGS.max_pixels,
        tiff_decoder=FLAGS.tiff_decoder,
        strict=FLAGS.strict,
        tile_mpp=FLAGS.tile_mpp,
        h5_key=FLAGS.h5_key,
        target_mpp=target_mpp,
        lr_factor=FLAGS.lr_factor,
        min_tissue=FLAGS.min_tissue,
    )
    return ConvertConfig(
        out_dir=FLAGS.out_dir,
        input_dir=FLAGS.input_dir,
        manifest=FLAGS.manifest,
        slides=tuple(FLAGS.slides),
        slide_labels=FLAGS.slide_labels,
        root=FLAGS.root,
        h5_images=FLAGS.h5_images,
        h5_labels=FLAGS.h5_labels,
        h5_labels_key=FLAGS.h5_labels_key,
        class_names=tuple(FLAGS.class_names),
        group_by=FLAGS.group_by,
        phash_distance=FLAGS.phash_distance,
        groups=FLAGS.groups,
        leakage_check=FLAGS.leakage_check,
        fractions=fractions,
        seed=FLAGS.seed,
        encode=encode,
        slide_mpp=FLAGS.slide_mpp,
        compression=FLAGS.compression,
        examples_per_shard=FLAGS.examples_per_shard,
        num_shards=FLAGS.num_shards,
        num_workers=FLAGS.num_workers,
        unit_size=FLAGS.unit_size,
        task_index=FLAGS.task_index,
        num_tasks=FLAGS.num_tasks,
        overwrite=FLAGS.overwrite,
        keep_parts=FLAGS.keep_parts,
        progress=FLAGS.progress,
        command=shlex.join([PROG, *sys.argv[1:]]),
    )


def main(argv: list[str]) -> None:
    """Runs the conversion the flags describe (bad input raises; ``fc.run`` prints one line)."""
    del argv  # all options are flags
    cfg = config_from_flags()
    if FLAGS.merge:
        info = merge(cfg)
    elif cfg.num_tasks > 1:
        done = run_task(cfg)
        print(
            f"{PROG}: task {cfg.task_index} of {cfg.num_tasks} done ({len(done['units'])} units); "
            "run with --merge once all tasks are done"
        )
        return
    else:
        info = convert(cfg)
    counts = {split: sum(c.values()) for split, c in info.counts.items()}
    for note in info.notes:
        if note.startswith(("leakage check", "group_by=", "groups from")):
            print(f"{PROG}: {note}")
    print(
        f"{PROG}: wrote {cfg.out_dir}: {counts}, {len(info.skipped)} inputs skipped (dataset.json)"
    )


def run() -> None:
    """Console-script entry point (kd-histo-convert)."""
    fc.run(PROG, main)


define_flags()

if __name__ == "__main__":
    run()
