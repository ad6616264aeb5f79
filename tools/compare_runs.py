"""python tools/compare_runs.py \\
    --pair=runs/abl:student_x8_unl100,runs/lc25000:baseline_x8,"students 30 ep" ...

Pairs runs across experiment folders (an ablation against the main run: same data, split and
seeds) and prints one markdown row per --pair: each run's test accuracy (mean ± sd over the seeds
both have), the paired difference a − b with its 95% interval (seeds and original-image groups
resampled) and each run's wall time. --out also writes the table to a file.
Thin shell over ``kd_histo.protocol.compare``.
"""

import sys

from absl import app, flags

flags.DEFINE_multi_string(
    "pair", [], "A,B[,label]: runs as <experiment folder>:<run name>; the row gives A - B."
)
flags.DEFINE_string("split", "test", "The split both runs were evaluated on.")
flags.DEFINE_integer("n_boot", 2000, "Bootstrap replicates of the 95% intervals.")
flags.DEFINE_string("out", "", "Also write the markdown table to this file.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from kd_histo.atomic import write_text
    from kd_histo.protocol.compare import RunRef, compare, markdown

    if not FLAGS.pair:
        print("compare_runs: error: give at least one --pair=A,B[,label]", file=sys.stderr)
        sys.exit(2)
    rows = []
    try:
        for text in FLAGS.pair:
            parts = text.split(",", 2)
            if len(parts) < 2:
                raise ValueError(f"--pair={text!r}: expected A,B[,label]")
            a, b = RunRef.parse(parts[0]), RunRef.parse(parts[1])
            label = parts[2] if len(parts) == 3 else ""
            rows.append(compare(a, b, label=label, split=FLAGS.split, n_boot=FLAGS.n_boot))
    except (OSError, ValueError) as e:
        print(f"compare_runs: error: {e}", file=sys.stderr)
        sys.exit(2)
    table = markdown(rows)
    print(table, end="")
    if FLAGS.out:
        write_text(FLAGS.out, table)
        print(f"compare_runs: wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
