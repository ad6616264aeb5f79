"""kd-histo-demo: the main job on the embedded (synthetic) default data, end to end.

    kd-histo-demo                      # or: make demo
    kd-histo-demo --out_dir=/tmp/demo --smoke

Renders synthetic H&E-like tiles, converts them to shards, trains the teacher, the LR baselines
and the label-free students at 2x, 4x and 8x, evaluates them, measures their compute cost, prints
the results table and writes <out_dir>/report/. A rerun skips what is finished. The training
settings are read from ``flags/demo/common.flags`` (the flagfile of the single kd-histo-train
steps, ``flags/demo/*.flags``) with kd-histo-train's flags: flags + that flagfile ->
``kd_histo.protocol.demo.run_demo``.
"""

from __future__ import annotations

import os
import time

import kd_histo
from kd_histo.cli import flags_common as fc
from kd_histo.cli import train as train_cli

PROG = "kd-histo-demo"
DEFAULT_OUT = "runs/demo"
# The demo's training settings: the flagfile in the source tree (kd_histo is installed editable).
COMMON_FLAGS = os.path.join(
    os.path.dirname(os.path.dirname(kd_histo.__file__)), "flags", "demo", "common.flags"
)
CONFIGS = ()
OWN_FLAGS = ("out_dir", "smoke")  # kd_histo.protocol.demo.run_demo's arguments
fc.define_binary_flags(CONFIGS, OWN_FLAGS)
FLAGS = fc.FLAGS


def main(argv: list[str]) -> None:
    del argv

    from kd_histo.protocol import demo

    start = time.perf_counter()
    out_dir = FLAGS.out_dir or DEFAULT_OUT
    # --data_dir and --mode are the demo's own (the flagfile's point at runs/demo for single steps).
    base = train_cli.config_from_flagfile(
        COMMON_FLAGS,
        f"--data_dir={os.path.join(out_dir, 'data')}",
        "--mode=teacher",
        f"--model_dir={os.path.join(out_dir, 'runs')}",
    )
    paths = demo.run_demo(
        out_dir,
        base,
        smoke=FLAGS.smoke,
        log=fc.log,
    )
    fc.print_file(paths["md"])
    print(
        f"{PROG}: finished in {(time.perf_counter() - start) / 60:.1f} min; report at "
        f"{paths['report']}"
    )


run = fc.entry_point(PROG, main)

if __name__ == "__main__":
    run()
