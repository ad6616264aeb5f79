"""Flag definitions of the kd-histo binaries and the error handling they share.

Each ``define_*_flags()`` is called by one binary's module at import; the library never reads
``absl.flags.FLAGS``. Definitions are idempotent, so tests can import several binaries into one
process. ``run(prog, main)`` starts a binary: flag errors and bad input end in one line,
``<prog>: error: <what to fix>``, and a non-zero exit, never a traceback. ``invoke(module, argv)``
runs a binary in-process (tests, notebooks) and returns its exit code.

Not here: turning flags into configs (each binary's ``main``).
"""

from __future__ import annotations

import errno
import math
import os
import re
import sys

# Before TensorFlow loads (the binaries import it lazily, in main), the one place the binaries
# choose TF's CPU kernels: oneDNN, for training and inference alike (1.4-1.9x the plain Eigen
# kernels' images/s, BUILD_NOTES.md "oneDNN"). TF_ENABLE_ONEDNN_OPTS=0 in the environment wins.
# The nets avoid the one oneDNN kernel of TF 2.16 that corrupts the heap (strided 1x1 backward
# weights with < 16 input channels; kd_histo.models.resnet_gn.projection_conv).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
# TensorFlow's C++ INFO and WARNING lines (grappler sessions, "TensorRT not found", the benign
# "OUT_OF_RANGE: End of sequence" at the end of every evaluation pass) would bury the binaries'
# own output; errors still show. TF_CPP_MIN_LOG_LEVEL=0 in the environment shows everything.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from typing import Callable, Sequence

from absl import app, flags

FLAGS = flags.FLAGS
EXIT_BAD_INPUT = 2
SKIP_CORRUPT_HELP = ("Converted data: skip corrupt records (bad bytes, a wrong tile size, a damaged shard's "
                     "tail) and say how many, instead of stopping at the first with the shard's name.")


def _define(kind: str, name: str, default, help_text: str, **kwargs) -> None:
    # Binaries share flag names (model_dir, out_dir, batch_size...) with the SAME defaults, so
    # importing several binaries into one process (tests) changes nothing: the first definition wins.
    if name in FLAGS:
        if FLAGS[name].default != default:
            raise AssertionError(f"flag --{name} defined twice with different defaults")
        return
    if kind == "enum":
        flags.DEFINE_enum(name, default, kwargs.pop("enum_values"), help_text, **kwargs)
    else:
        getattr(flags, f"DEFINE_{kind}")(name, default, help_text, **kwargs)


def define_data_flags() -> None:
    """Flags of the input pipeline (kd_histo.data.pipeline.PipelineConfig)."""
    _define("string", "data_dir", None, "Folder with shards + dataset.json (kd-histo-convert output).")
    _define("float", "factor", 2.0, "Resolution factor of the LR view (2, 4, 8).")
    _define("integer", "hr_px", None, "Side of the HR view; default the stored tile size (smaller: crop).")
    _define("integer", "batch_size", 32, "Examples per batch.")
    _define("string", "lr_method", "area", "How the LR view is made: area, bicubic, bilinear, pyramid.")
    _define("string", "augment", "paper", "Training augmentation preset.")
    _define("float", "unlabeled_ratio", 0.0, "Fraction of training examples from the unlabeled pool.")
    _define("list", "unlabeled_dirs", [], "More converted folders for the unlabeled pool (comma separated).")
    _define("bool", "labeled", True, "Read the labeled train split (distill uses its labels only with "
            "--ce_weight > 0); --nolabeled trains a student on the unlabeled pool alone.")
    _define("bool", "cache", False, "Keep decoded tiles in memory after the first pass.")


def define_train_flags() -> None:
    """Flags of kd-histo-train."""
    define_data_flags()
    _define("enum", "mode", None, "teacher (labels, HR), baseline (labels, LR), distill (teacher -> student).",
            enum_values=["teacher", "baseline", "distill"])
    _define("string", "model_dir", None, "Run folder to create (or resume).")
    _define("string", "arch", "resnet_gn", "Network: resnet_gn (paper), resnet18, resnet34, resnet50.")
    _define("list", "planes", [], "Stage widths of resnet_gn, e.g. 32,64,128,256 (default the builder's).")
    _define("string", "stem", "imagenet", "resnet_gn stem: imagenet (stride 4) or small (stride 1).")
    _define("string", "norm", "group", "Normalisation layers: group or batch.")
    _define("string", "teacher", "", "distill: the teacher's run folder or model.keras.")
    _define("float", "temperature", 4.0, "KD softmax temperature T (loss scaled by T^2).")
    _define("float", "kd_weight", 1.0, "Weight of KL(teacher || student).")
    _define("float", "feature_weight", 1.0, "Weight of the feature-map loss.")
    _define("string", "feature_mode", "maxpool+bicubic", "Teacher map resize: maxpool, bicubic, maxpool+bicubic.")
    _define("string", "feature_norm", "l2", "Feature loss norm: l2 or l1.")
    _define("float", "ce_weight", 0.0, "distill: weight of cross-entropy on labeled tiles.")
    _define("float", "ssl_weight", 0.0, "distill: weight of the contrastive (InfoNCE) term.")
    _define("float", "at_weight", 0.0, "distill: weight of attention transfer.")
    _define("integer", "accumulation_steps", 1, "Micro-batches per optimizer update.")
    _define("string", "teacher_cache", "", "distill: folder of a teacher-output cache (built when missing; "
            "auto = <model_dir>/teacher_cache): the teacher runs once per tile and flip/rotation, not every "
            "epoch. Needs --augment=flips or none and no --hr_px crop.")
    _define("string", "optimizer", "adam", "adam, adamw or sgd.")
    _define("float", "learning_rate", 1e-3, "Peak learning rate (paper: 1e-3).")
    _define("float", "weight_decay", 1e-4, "Weight decay (paper: 1e-4).")
    _define("string", "schedule", "cosine", "Learning-rate schedule: constant, cosine, exponential.")
    _define("float", "decay_rate", 0.9, "Exponential schedule: factor per epoch.")
    _define("float", "warmup_epochs", 0.0, "Cosine schedule: linear warm-up length in epochs.")
    _define("integer", "epochs", 30, "Training epochs.")
    _define("integer", "steps_per_epoch", 0, "Batches per epoch; 0 = one pass over the train split.")
    _define("integer", "val_steps", 0, "Validation batches; 0 = the whole val split.")
    _define("string", "precision", "float32", "float32, mixed_float16 or mixed_bfloat16.")
    _define("string", "strategy", "default", "default, mirrored or multi_worker (TF_CONFIG).")
    _define("integer", "seed", 0, "Seed of weights, data order and augmentation.")
    _define("bool", "resume", True, "Continue an unfinished run found in model_dir.")
    _define("string", "monitor", "val_accuracy", "Metric picking the best epoch: val_accuracy or val_loss.")
    _define("bool", "allow_no_val", False, "Train without a val split (keeps the last epoch).")
    _define("bool", "skip_corrupt", False, SKIP_CORRUPT_HELP)
    _define("list", "profile_steps", ["2", "4"], "TensorBoard profile window first,last step; 0,0 = off.")
    _define("bool", "smoke", False, "Shrink everything to run in seconds (tiny net, 2 epochs of 2 steps).")
    _define("integer", "verbose", 2, "Keras progress: 0 silent, 1 bar, 2 one line per epoch.")


def define_evaluate_flags() -> None:
    """Flags of kd-histo-evaluate."""
    _define("string", "model_dir", None, "Run folder (holds run.json and model.keras).")
    _define("string", "data_dir", None, "Folder with shards; default the run's own data set.")
    _define("string", "split", "test", "Split to evaluate: test or val.")
    _define("string", "out_dir", "", "Where to write results; default <model_dir>/eval_<split>.")
    _define("integer", "batch_size", 32, "Tiles per batch.")
    _define("integer", "n_boot", 1000, "Bootstrap replicates of the 95% intervals.")
    _define("bool", "skip_corrupt", False, SKIP_CORRUPT_HELP)
    _define("list", "compare", [], "Evaluation folders (with metrics.json) to put in one table.")
    _define("list", "names", [], "Row names of --compare (default the folder names).")
    _define("string", "compare_out", "comparison", "Path prefix of the comparison table (.md and .csv).")
    _define("string", "cascade_teacher", "", "Teacher run folder: also measure the cascade (the teacher "
            "re-scores the student's least confident tiles at high resolution).")
    _define("list", "cascade_fractions", ["0", "0.05", "0.1", "0.2", "0.5"], "Teacher shares of the cascade's "
            "accuracy-vs-cost curve (cascade.csv, cascade.png).")


def define_cost_flags() -> None:
    """Flags of kd-histo-cost."""
    _define("list", "runs", [], "Run folders; the first (the teacher) is the reference of the ratios.")
    _define("list", "names", [], "Row names (default the folder names).")
    _define("string", "out_dir", "", "Where cost.json, cost.md and the profile trace go (default ./cost).")
    _define("list", "batch_sizes", ["1", "8", "32"], "Batch sizes of the latency measurement.")
    _define("integer", "repeats", 5, "Timed repeats per batch size (median reported).")
    _define("integer", "trace_steps", 3, "Training steps in the TensorBoard trace; 0 = none.")


def define_predict_flags() -> None:
    """Flags of kd-histo-predict."""
    _define("string", "model_dir", None, "Run folder of the model (run.json + model.keras).")
    _define("list", "inputs", [], "Tile folders, converted data folders, or whole-slide image files.")
    _define("string", "out_dir", "", "Where the CSVs and heatmaps go (default ./predictions).")
    _define("string", "split", "test", "Split read from a converted data folder.")
    _define("integer", "batch_size", 32, "Tiles per batch.")
    # Shared with kd-histo-convert (same default); predict uses it only when given (FLAGS[..].present).
    _define("float", "target_mpp", 0.5, "Slides: µm/px of the HR tiles. kd-histo-predict: only when given, "
            "to override the run's training tiles' µm/px (run.json), or when that is unknown.")
    _define("float", "min_tissue", 0.5, "Slides: fraction of tissue a tile needs.")
    _define("integer", "max_tiles", 0, "Slides: at most this many tiles per slide (0 = all).")
    _define("bool", "heatmap", False, "Slides: write a probability heatmap over the thumbnail.")
    _define("bool", "skip_corrupt", False, SKIP_CORRUPT_HELP)
    _define("integer", "num_workers", 2, "Parallel workers: kd-histo-predict's slide reader threads "
            "(0 = in this process).")
    _define("string", "cascade_teacher", "", "Teacher run folder: it re-scores the student's least confident "
            "tiles at high resolution (with --cascade_fraction or --cascade_threshold).")
    _define("float", "cascade_fraction", None, "Cascade: share of each slide's (or folder's) tiles the teacher "
            "re-scores, the least confident first.")
    _define("float", "cascade_threshold", None, "Cascade: instead, the teacher re-scores every tile whose top "
            "class probability is below this.")


def define_experiment_flags() -> None:
    """Flags of kd-histo-experiment (beside the training flags, which set every run's template)."""
    _define("string", "out_dir", "", "Experiment folder: runs, cost, results and report.")
    _define("list", "factors", ["2", "4", "8"], "Resolution factors of the baselines and students.")
    _define("list", "unlabeled_fractions", ["auto"], "Fractions of the unlabeled pool added to the students' "
            "tiles, e.g. 0,0.25,0.5,1; auto = 0,0.25,0.5,1 when there is unlabeled data, else 0.")
    _define("list", "seeds", ["0"], "One whole protocol per seed.")
    _define("integer", "teacher_epochs", 0, "Epochs of the teacher (0 = --epochs); baselines and students "
            "keep --epochs.")
    _define("integer", "student_epochs", 0, "Epochs of the students (0 = --epochs): distillation "
            "students keep improving long after supervised nets stop; train_s in the report gives "
            "each run's wall time for an equal-time comparison.")
    _define("integer", "baseline_epochs", 0, "Epochs of the LR baselines (0 = --epochs).")
    _define("float", "labeled_student_ce", 0.0, "> 0 adds, per factor, a student that also learns "
            "from the labels where they exist (cross-entropy with this weight beside KD) and reads "
            "the largest unlabeled fraction: run student_ce_x<factor>. 0 = none.")
    _define("bool", "baselines", True, "Train the LR baselines (labels, LR view).")
    _define("string", "eval_split", "test", "Split every run is evaluated on: test or val.")
    _define("integer", "n_boot", 1000, "Bootstrap replicates of the 95% intervals.")
    _define("list", "cost_batch_sizes", ["1", "32"], "Latency batch sizes; the last gives the speedup.")
    _define("list", "cascade_fractions", ["0", "0.05", "0.1", "0.2", "0.5"], "Teacher shares of the cascade "
            "measured for each factor's student (report: cascade rows); empty = none.")
    _define("string", "title", "kd_histo experiment", "Title of the report.")


def define_demo_flags() -> None:
    """Flags of kd-histo-demo."""
    _define("string", "out_dir", "", "Demo folder (default runs/demo, where flags/demo/*.flags point).")
    _define("bool", "smoke", False, "Shrink everything to run in seconds (tiny data, nets and epochs).")


def float_list(values: Sequence[str], name: str) -> tuple[float, ...]:
    """A list flag of numbers, with a one-line error naming the flag."""
    try:
        numbers = tuple(float(v) for v in values)
    except ValueError:
        raise ValueError(f"--{name} takes numbers separated by commas, got {','.join(values)}") from None
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError(f"--{name} takes finite numbers, got {','.join(values)}")
    return numbers


def int_list(values: Sequence[str], name: str) -> tuple[int, ...]:
    """A list flag of integers, with a one-line error naming the flag."""
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(f"--{name} takes integers separated by commas, got {','.join(values)}") from None


def require(**values) -> None:
    """Raises a one-line error for the first required flag that is unset."""
    for name, value in values.items():
        if value in (None, "", []):
            raise ValueError(f"--{name} is required")


def _parser(prog: str) -> Callable[[list[str]], list[str]]:
    def parse(argv: list[str]) -> list[str]:
        try:
            rest = FLAGS(argv)
        except flags.Error as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
        # absl.app raises an unset --verbosity to INFO, which floods the binaries' own output
        # with TensorFlow's SavedModel chatter; warnings and errors still show (--verbosity=0: all).
        if FLAGS["verbosity"].using_default_value:
            FLAGS.verbosity = -1
        # NaN passes every range check (comparisons with it are false) and inf slips through
        # divisions, so refuse both in any number flag before a run starts.
        for name in FLAGS:
            value = FLAGS[name].value
            if isinstance(value, float) and not math.isfinite(value):
                print(f"{prog}: error: --{name} must be a finite number, got {value}", file=sys.stderr)
                sys.exit(EXIT_BAD_INPUT)
        return rest

    return parse


BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)

# What to do about an OSError of the environment rather than of a flag (by errno).
_OS_HINTS = {
    errno.EEXIST: "a file is in the way of a folder: choose another path or move the file",
    errno.ENOTDIR: "a file is in the way of a folder: choose another path or move the file",
    errno.EISDIR: "a folder is in the way of a file: choose another path",
    errno.ENOSPC: "the disk is full: free space and rerun the same command (finished work is kept)",
    errno.EDQUOT: "the disk quota is used up: free space and rerun the same command",
    errno.EFBIG: "a file size limit was reached (ulimit -f, or the file system's): raise it or free "
                 "space and rerun the same command (finished work is kept)",
    errno.EROFS: "the file system is read-only: choose another path",
}


def _os_error_line(e: OSError) -> str:
    """One line for an OSError: the file, the system's words, what to do."""
    where = f"{e.filename}: " if e.filename else ""
    what = e.strerror or (str(e).splitlines() or [type(e).__name__])[0]
    hint = _OS_HINTS.get(e.errno, "")
    return f"{where}{what}" + (f"; {hint}" if hint else "")


def _tf_error_line(e: BaseException) -> str:
    """One line for a TensorFlow runtime error: kd_histo's own assertion text when it is one
    (a corrupt shard names itself), else the first line TensorFlow gives, without node names."""
    message = getattr(e, "message", "") or str(e)
    own = re.search(r"kd_histo: (.*?)\]", message)
    if own:
        return own.group(1)
    lines = [re.sub(r"\{\{[^}]*\}\}\s*", "", line).strip() for line in message.splitlines()]
    lines = [line for line in lines if line and not line.startswith("[[")]
    line = f"TensorFlow: {lines[0] if lines else type(e).__name__}"
    for code, words in ((errno.ENOSPC, "No space left"), (errno.EFBIG, "File too large")):
        if words in message:  # TensorFlow's file system reports errno's words, not the errno
            return f"{line}; {_OS_HINTS[code]}"
    return line


def _tf_op_error() -> tuple[type, ...]:
    """TensorFlow's runtime error class, if TensorFlow is loaded (the binaries load it lazily)."""
    tf = sys.modules.get("tensorflow")
    op_error = getattr(getattr(tf, "errors", None), "OpError", None)
    return (op_error,) if isinstance(op_error, type) else ()


def guarded(prog: str, main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Wraps ``main`` so bad input ends in ``<prog>: error: ...`` and exit code 2.

    Bad input is a ``ValueError`` (the library's refusals), a file that is missing or not
    readable, any other ``OSError`` (a file in the way of a folder, a full disk, a file size
    limit) and TensorFlow's runtime errors (``tf.errors.OpError``: a corrupt shard, a failed
    write): each is one line, never a traceback.
    """

    def fail(message: str) -> None:
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)

    def wrapped(argv: list[str]) -> None:
        if len(argv) > 1:
            fail(f"unexpected arguments {argv[1:]}; all options are --flags")
        try:
            main(argv)
        except BAD_INPUT as e:
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
        except OSError as e:
            fail(_os_error_line(e))
        except Exception as e:
            if isinstance(e, _tf_op_error()):
                fail(_tf_error_line(e))
            raise

    return wrapped


def _show_in_help() -> None:
    # absl's --help lists the key flags of the main module (sys.argv[0]); ours are registered
    # under this module, which calls DEFINE_*, so make them key flags of the running binary.
    for flag in FLAGS.flags_by_module_dict().get(__name__, []):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run(prog: str, main: Callable[[list[str]], None]) -> None:
    """Console-script entry: parse flags (one-line errors), then the guarded ``main``."""
    _show_in_help()
    app.run(guarded(prog, main), flags_parser=_parser(prog))


def invoke(prog: str, main: Callable[[list[str]], None], argv: Sequence[str]) -> int:
    """Runs a binary in-process with ``argv`` (without the program name); returns the exit code."""
    FLAGS.unparse_flags()
    try:
        rest = _parser(prog)([prog, *argv])
        guarded(prog, main)(rest)
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        FLAGS.unparse_flags()
    return 0
