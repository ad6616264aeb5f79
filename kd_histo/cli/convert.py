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
CONFIGS = (ConvertConfig, EncodeOptions)
OWN_FLAGS = ("target_mag", "merge")
fc.define_binary_flags(CONFIGS, OWN_FLAGS)
FLAGS = fc.FLAGS


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
    encode = EncodeOptions(**fc.config_kwargs(EncodeOptions, target_mpp=target_mpp))
    return ConvertConfig(
        **fc.config_kwargs(
            ConvertConfig,
            fractions=fractions,
            encode=encode,
            command=shlex.join([PROG, *sys.argv[1:]]),
        )
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
            fc.log(note)
    print(
        f"{PROG}: wrote {cfg.out_dir}: {counts}, {len(info.skipped)} inputs skipped (dataset.json)"
    )


run = fc.entry_point(PROG, main)

if __name__ == "__main__":
    run()
