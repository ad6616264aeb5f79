"""kd-histo-convert --input_dir=<class folders> --out_dir=<data dir> --tile_px=224

Converts tile folders, CSV manifests and whole-slide images into sharded TFRecords + dataset.json.

  kd-histo-convert --manifest=tiles/manifest.csv --out_dir=data --tile_px=64
  kd-histo-convert --input_dir=lc25000_lung --group_by=phash --out_dir=data --num_workers=2
  kd-histo-convert --slides=slides/ --slide_labels=labels.csv --target_mpp=0.5 --lr_factor=4 \\
      --out_dir=data
  # many machines: each runs its task, then one merges
  kd-histo-convert ... --task_index=$SLURM_ARRAY_TASK_ID --num_tasks=8
  kd-histo-convert ... --num_tasks=8 --merge

Bad inputs are reported as ``kd-histo-convert: error: <what to fix>`` with exit status 1.
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "TF_CPP_MIN_LOG_LEVEL", "2"
)  # a data tool: TensorFlow's start-up chatter hides its output

import shlex  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402

from kd_histo.convert import ConversionError, ConvertConfig, EncodeOptions, convert, merge, run_task  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this binary's flags (called once, when the cli module is imported)."""
    if "out_dir" in FLAGS:
        return
    flags.DEFINE_string("out_dir", None, "Output folder for shards and dataset.json.")
    flags.DEFINE_string(
        "input_dir", "", "Folder of class subfolders (unlabeled/ = unlabeled tiles)."
    )
    flags.DEFINE_string(
        "manifest", "", "CSV: path,label[,slide_id][,patient_id][,split]; empty label = unlabeled."
    )
    flags.DEFINE_list(
        "slides",
        [],
        "Whole-slide image files, folders or globs (unlabeled unless in --slide_labels).",
    )
    flags.DEFINE_string(
        "slide_labels", "", "CSV of slides: path,label[,slide_id][,patient_id][,split]."
    )
    flags.DEFINE_string(
        "h5_images", "", "HDF5 file of uint8 image patches [N,H,W,3] (e.g. PatchCamelyon *_x.h5)."
    )
    flags.DEFINE_string("h5_labels", "", "HDF5 file of their labels (e.g. *_y.h5); '' = unlabeled.")
    flags.DEFINE_string("h5_key", "x", "Dataset name of the patches in --h5_images.")
    flags.DEFINE_string("h5_labels_key", "y", "Dataset name of the labels in --h5_labels.")
    flags.DEFINE_string("root", "", "If set, manifest paths must lie inside this folder.")
    flags.DEFINE_list("class_names", [], "Class order (default: sorted label names).")
    flags.DEFINE_enum(
        "group_by",
        "slide",
        ["slide", "phash"],
        "Pseudo-slides: ids as given, or near-duplicate groups.",
    )
    flags.DEFINE_integer(
        "phash_distance", 8, "Bits (of 64) within which two tiles count as near-copies."
    )
    flags.DEFINE_list("split_fractions", ["0.7", "0.15", "0.15"], "train,val,test shares.")
    flags.DEFINE_integer("seed", 0, "Split seed.")
    flags.DEFINE_integer("tile_px", 224, "Side of the stored tiles in pixels.")
    flags.DEFINE_enum(
        "fit", "crop", ["crop", "resize"], "Tile images of another size: centre-crop or resize."
    )
    flags.DEFINE_enum(
        "image_format", "png", ["png", "jpeg"], "PNG is lossless; JPEG with --jpeg_quality."
    )
    flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality (1-100).")
    flags.DEFINE_integer("png_level", 6, "PNG zlib level (0-9); lossless at every level.")
    flags.DEFINE_integer(
        "max_pixels", 100_000_000, "Tile images with more pixels are refused (decompression bombs)."
    )
    flags.DEFINE_enum(
        "tiff_decoder", "pil", ["pil", "tfio"], "Decode .tif tiles with Pillow or tensorflow-io."
    )
    flags.DEFINE_float("tile_mpp", 0.0, "µm/px of tile images when known (recorded; 0 = unknown).")
    flags.DEFINE_float("target_mpp", 0.5, "µm/px of slide tiles.")
    flags.DEFINE_float(
        "target_mag", 0.0, "Alternative to --target_mpp: magnification, with 10x = 1.0 µm/px."
    )
    flags.DEFINE_float("slide_mpp", 0.0, "Level-0 µm/px for slides whose metadata lacks it.")
    flags.DEFINE_integer(
        "lr_factor", 0, "Also store the aligned LR slide tile, tile_px/lr_factor wide (0 = no)."
    )
    flags.DEFINE_float("min_tissue", 0.5, "Fraction of tissue a slide tile needs to be kept.")
    flags.DEFINE_bool("strict", False, "Fail on the first unreadable input instead of skipping it.")
    flags.DEFINE_enum("compression", "", ["", "GZIP"], "Shard compression.")
    flags.DEFINE_integer("examples_per_shard", 1000, "Target shard size (when --num_shards=0).")
    flags.DEFINE_integer("num_shards", 0, "Shards per split (0 = from --examples_per_shard).")
    flags.DEFINE_integer(
        "unit_size", 64, "Tiles per work unit: the granularity of resume and progress."
    )
    flags.DEFINE_integer("num_workers", 2, "Worker processes (0 = in this process).")
    flags.DEFINE_integer(
        "task_index", 0, "This task among --num_tasks (Slurm/Kubernetes array index)."
    )
    flags.DEFINE_integer("num_tasks", 1, "Independent tasks; with > 1, finish with --merge.")
    flags.DEFINE_bool(
        "merge", False, "Only merge the finished tasks' parts into shards + dataset.json."
    )
    flags.DEFINE_bool("overwrite", False, "Replace a data set already in --out_dir.")
    flags.DEFINE_bool("keep_parts", False, "Keep <out_dir>/.parts after the merge.")
    flags.DEFINE_bool("progress", True, "Progress bar on stderr.")


def config_from_flags(argv: list[str]) -> ConvertConfig:
    """Turns the parsed flags into a ConvertConfig (raises ConversionError on bad values)."""
    if not FLAGS.out_dir:
        raise ConversionError(
            "--out_dir is required: the folder to write shards and dataset.json to"
        )
    try:
        fractions = tuple(float(x) for x in FLAGS.split_fractions)
    except ValueError:
        raise ConversionError(
            f"--split_fractions must be three numbers, got {FLAGS.split_fractions}"
        ) from None
    if len(fractions) != 3:
        raise ConversionError(
            f"--split_fractions needs train,val,test (3 numbers), got {FLAGS.split_fractions}"
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
        command=shlex.join(["kd-histo-convert", *sys.argv[1:]]),
    )


def main(argv: list[str]) -> int:
    """Runs the conversion the flags describe; prints a one-line error on bad input."""
    try:
        cfg = config_from_flags(argv)
        if FLAGS.merge:
            info = merge(cfg)
        elif cfg.num_tasks > 1:
            done = run_task(cfg)
            print(
                f"task {cfg.task_index} of {cfg.num_tasks} done ({len(done['units'])} units); "
                f"run with --merge once all tasks are done"
            )
            return 0
        else:
            info = convert(cfg)
    except (ConversionError, FileNotFoundError, PermissionError) as e:
        print(f"kd-histo-convert: error: {e}", file=sys.stderr)
        return 1
    counts = {split: sum(c.values()) for split, c in info.counts.items()}
    print(f"wrote {cfg.out_dir}: {counts}, {len(info.skipped)} inputs skipped (see dataset.json)")
    return 0


def run() -> None:
    """Console-script entry point (kd-histo-convert)."""
    app.run(main)


define_flags()

if __name__ == "__main__":
    run()
