"""kd-histo-demo: the main job on the embedded (synthetic) default data, end to end.

    kd-histo-demo                      # or: make demo
    kd-histo-demo --out_dir=/tmp/demo --smoke

Renders synthetic H&E-like tiles, converts them to shards, trains the teacher, the LR baselines
and the label-free students at 2x, 4x and 8x, evaluates them, measures their compute cost, prints
the results table and writes <out_dir>/report/. A rerun skips what is finished.
Flags -> ``kd_histo.protocol.demo.run_demo``.
"""

from __future__ import annotations

from kd_histo.cli import flags_common as fc

PROG = "kd-histo-demo"
DEFAULT_OUT = "runs/demo"
fc.define_demo_flags()
FLAGS = fc.FLAGS


def main(argv: list[str]) -> None:
    del argv
    import time

    from kd_histo.protocol import demo
    start = time.perf_counter()
    paths = demo.run_demo(
        FLAGS.out_dir or DEFAULT_OUT,
        smoke=FLAGS.smoke,
        log=lambda line: print(f"{PROG}: {line}", flush=True),
    )
    print(open(paths["md"]).read(), end="")
    print(
        f"{PROG}: finished in {(time.perf_counter() - start) / 60:.1f} min; report at {paths['report']}"
    )


def run() -> None:
    fc.run(PROG, main)


if __name__ == "__main__":
    run()
