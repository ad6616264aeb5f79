"""python tools/ood_flag_rates.py --model_dir=runs/lc25000/runs/s0/teacher
    [--splits=val,test,unlabeled] [--data_dir=...]

How much of each split of a run's data its out-of-domain score flags: 5% of val by construction
(the calibration tiles); on test, and for a teacher on the unlabeled split (tiles it never trained
on), whether that 5% holds, and how far the flags cluster by group (slide, or original image with
``--groups``). Thin shell over ``kd_histo.evaluation.ood_report.flagged_by_split``.
"""

from kd_histo.cli import flags_common as fc  # first: it sets TensorFlow's log level

PROG = "ood_flag_rates"
fc.flags.DEFINE_multi_string("model_dir", [], "Run folder(s) with an ood.npz (repeat the flag).")
fc.flags.DEFINE_list("splits", ["val", "test", "unlabeled"], "Splits of the run's data to score.")
fc.flags.DEFINE_string("data_dir", "", "Converted data; '' = the run's own.")
FLAGS = fc.FLAGS


def main(argv):
    del argv
    from kd_histo.evaluation.ood_report import flagged_by_split

    if not FLAGS.model_dir:
        fc.fail(PROG, "give --model_dir=<run folder>")
    print("| run | split | tiles | flagged | groups | groups > half flagged |")
    print("|---|---|---:|---:|---:|---:|")
    for model_dir in FLAGS.model_dir:
        for r in flagged_by_split(model_dir, FLAGS.splits, FLAGS.data_dir):
            print(
                f"| {model_dir} | {r.split} | {r.tiles} | {100 * r.flagged:.1f}% | {r.groups} "
                f"| {r.groups_mostly_flagged} |"
            )


if __name__ == "__main__":
    fc.log_as(PROG)
    fc.run(PROG, main)
