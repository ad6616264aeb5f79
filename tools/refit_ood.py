"""python tools/refit_ood.py --model_dir=runs/domain_shift/s0/student_x8_none [--data_dir=...]

Measures a trained run's out-of-domain statistics again, without training: the current score's
terms (kd_histo.models.ood: the input's and the early stages' channel statistics, the pooled last
map) on its labeled training tiles, the threshold on its val tiles (5% of them flagged). Rewrites
the run's ood.npz and run.json's ood_threshold; the run's evaluations and predictions made before
must be made again (a cohort's fingerprint sees the new files). For runs trained before the
multi-depth score (issue 30), or after changing it. Thin shell over
``kd_histo.training.domain.refit_ood``.
"""

from kd_histo.cli import flags_common as fc  # first: it sets TensorFlow's log level

PROG = "refit_ood"
fc.flags.DEFINE_multi_string("model_dir", [], "Run folder(s) to refit (repeat the flag).")
fc.flags.DEFINE_string("data_dir", "", "Converted data with train and val splits; '' = the run's.")
FLAGS = fc.FLAGS


def main(argv):
    del argv
    from kd_histo.training.domain import refit_ood

    if not FLAGS.model_dir:
        fc.fail(PROG, "give --model_dir=<run folder>")
    for model_dir in FLAGS.model_dir:
        stats = refit_ood(model_dir, FLAGS.data_dir, log=fc.log)
        if stats is None:
            fc.fail(PROG, f"{model_dir}: no out-of-domain statistics could be fitted (see above)")
        terms = ", ".join(f"{t.layer} ({t.moments})" for t in stats.terms)
        fc.log(
            f"{model_dir}: refitted on {stats.num_fit} training tiles, threshold "
            f"{stats.threshold:.3g} on {stats.num_calibration} val tiles; terms: {terms}"
        )


if __name__ == "__main__":
    fc.log_as(PROG)
    fc.run(PROG, main)
