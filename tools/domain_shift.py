"""python tools/domain_shift.py --flagfile=flags/lc25000/domain_shift.flags [--seeds=0,1,2]
    [--teachers_from=runs/lc25000] [--redo=none,hed/student_x8]

Issue 30's measurements: per seed and setting (no normalisation, Macenko/Reinhard stain
normalisation, HED jitter in training) a teacher and a label-free x8 student of the main
experiment's template, each measured on the test tiles, on two stain-shifted copies of them, on
the NCT-CRC-HE tiles and the CMU skin slide (out-of-domain flag), and the student's cost of the
score. Resumable: rows already in <results_dir>/results.csv are not redone (commit it), except
those of an older out-of-domain score and those of the settings or setting/nets --redo names.
--teachers_from=<main experiment folder> takes its teachers as the `none` setting's (the same
flags: checked) instead of training them again.
Thin shell over ``kd_histo.protocol.domain_shift``.
"""

import shlex
import sys

from kd_histo.cli import flags_common as fc  # first: it sets TensorFlow's log level
from kd_histo.cli import train as train_cli
from kd_histo.protocol.domain_shift import DomainShiftConfig

PROG = "domain_shift"
fc.define_config_flags(DomainShiftConfig)
FLAGS = fc.FLAGS
ABOUT = (
    "Made by `python tools/domain_shift.py --flagfile=flags/lc25000/domain_shift.flags` "
    "(kd_histo.protocol.domain_shift); how, and what each column means: README.md beside this "
    "file. Accuracies and flagged shares in %, mean ± sd over the seeds measured so far; drops "
    "in points against the same net on the original test tiles."
)


def main(argv):
    del argv
    from kd_histo.protocol import domain_shift

    fc.require(data_dir=FLAGS.data_dir, out_dir=FLAGS.out_dir)
    base = train_cli.config_from_flags(mode="teacher", model_dir=FLAGS.out_dir)
    kw = fc.config_kwargs(DomainShiftConfig, base=base)
    kw["settings"] = tuple(kw["settings"])
    cfg = DomainShiftConfig(**kw)
    command = shlex.join(["python", "tools/domain_shift.py", *sys.argv[1:]])
    domain_shift.run(cfg, command, ABOUT, log=fc.log)


if __name__ == "__main__":
    fc.log_as(PROG)
    fc.run(PROG, main)
