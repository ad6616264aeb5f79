"""The kd-histo binaries' flags, generated from the config dataclasses, and their error handling.

A setting is declared once, as a config dataclass field (``kd_histo.settings.setting``: default,
help, flag name, choices); ``define_config_flags(*configs)`` defines a flag per such field and
``config_kwargs(config)`` turns the parsed flags back into that config's keyword arguments (list
flags into typed tuples). ``OWN_FLAGS`` holds the few switches of the binaries that are no
config field (``--smoke``, ``--merge``...). Each binary's module defines its flags at import; the
library never reads ``absl.flags.FLAGS``. Definitions are idempotent, so tests can import several
binaries into one process. ``run(prog, main)`` starts a binary: flag errors and bad input end in
one line, ``<prog>: error: <what to fix>``, and a non-zero exit, never a traceback.

What a binary says: its progress, notes, warnings and errors go through Python's ``logging``
(the logging absl's is built on; the library logs under ``kd_histo.<module>``), shown by
:func:`log_as` as ``kd-histo-<tool>: <message>`` lines on stderr; stdout holds only the
command's results (what was written, the metrics, a results table), so a user can pipe them.
``invoke(module, argv)`` runs a binary in-process (tests, notebooks) and returns its exit code.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import math
import os
import re
import sys
import types
import typing

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
from collections.abc import Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging

from kd_histo.progress import around_bars

FLAGS = flags.FLAGS
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command ended by Ctrl-C
INTERRUPTED = "interrupted; rerun the same command to resume"

_LOG = logging.getLogger("kd_histo")


class _Stderr(logging.StreamHandler):
    """``<prog>: <message>`` on the sys.stderr of the moment (a redirect, pytest's capture)."""

    def __init__(self, prog: str):
        super().__init__()
        self.setFormatter(logging.Formatter(f"{prog}: %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler sets it once; the stream is always sys.stderr
        pass

    def emit(self, record: logging.LogRecord) -> None:
        with around_bars():  # a progress bar on the terminal steps aside for the line
            super().emit(record)


def log(line: str) -> None:
    """One progress line of the running binary: ``<prog>: <line>`` on stderr (:func:`log_as`)."""
    _LOG.info(line)


def _not_ours(record: logging.LogRecord) -> bool:
    return not record.name.startswith("kd_histo")


def log_as(prog: str) -> None:
    """kd_histo's messages (the ``kd_histo`` loggers, INFO and up) as ``<prog>: <message>``
    lines on stderr; absl's handler (whose header and --verbosity stay TensorFlow's) leaves them
    out. They still reach the root logger's other handlers (pytest's ``caplog``)."""
    for handler in [h for h in _LOG.handlers if isinstance(h, _Stderr)]:
        _LOG.removeHandler(handler)
    _LOG.addHandler(_Stderr(prog))
    _LOG.setLevel(logging.INFO)
    absl_handler = absl_logging.get_absl_handler()
    if _not_ours not in absl_handler.filters:
        absl_handler.addFilter(_not_ours)


def _define(
    kind: str, name: str, default, help_text: str, fv: flags.FlagValues = FLAGS, **kwargs
) -> None:
    # Binaries share flag names (model_dir, out_dir, batch_size...) with the SAME defaults, so
    # importing several binaries into one process (tests) changes nothing: the first definition
    # wins.
    if name in fv:
        if fv[name].default != default:
            raise AssertionError(f"flag --{name} defined twice with different defaults")
        return
    if kind == "enum":
        flags.DEFINE_enum(
            name, default, kwargs.pop("enum_values"), help_text, flag_values=fv, **kwargs
        )
    else:
        getattr(flags, f"DEFINE_{kind}")(name, default, help_text, flag_values=fv, **kwargs)


@dataclasses.dataclass(frozen=True)
class ConfigFlag:
    """The flag of one config dataclass field (``kd_histo.settings.setting``)."""

    field: dataclasses.Field
    name: str  # the flag's name
    kind: str  # absl's DEFINE_<kind>: string, enum, integer, float, bool, list
    item: type | None  # list flags: the type of one item (str, int, float)

    @property
    def required(self) -> bool:
        return self.field.default is dataclasses.MISSING

    @property
    def default(self):
        """The flag's default, as absl holds it (lists as strings)."""
        meta = self.field.metadata
        value = meta.get("flag_default", self.field.default)
        if value is dataclasses.MISSING:
            return [] if self.kind == "list" else None
        if self.kind == "list":
            return [_item_text(v) for v in value]
        return value


def _item_text(value) -> str:
    """``2.0`` -> "2", ``0.05`` -> "0.05": list items as a user writes them."""
    if isinstance(value, float) and float(f"{value:g}") == value:
        return f"{value:g}"
    return str(value)


def config_flags(cls: type) -> list[ConfigFlag]:
    """The flags of a config dataclass: its fields with a help text, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        kind, item = _kind(hints[f.name])
        if "choices" in f.metadata:
            kind = "enum"
        out.append(ConfigFlag(f, f.metadata.get("flag", f.name), kind, item))
    return out


def _kind(hint) -> tuple[str, type | None]:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # int | None: an optional int
        hint = args[0]
    if typing.get_origin(hint) is tuple:
        return "list", args[0]
    return {bool: "bool", int: "integer", float: "float", str: "string"}[hint], None


def define_config_flags(*classes: type, fv: flags.FlagValues = FLAGS) -> None:
    """A flag per field of ``classes`` that has a help text (name, default, help, choices)."""
    for cls in classes:
        for flag in config_flags(cls):
            meta = flag.field.metadata
            choices = {"enum_values": list(meta["choices"])} if flag.kind == "enum" else {}
            _define(flag.kind, flag.name, flag.default, meta["help"], fv, **choices)


def config_kwargs(cls: type, fv: flags.FlagValues = FLAGS, **given) -> dict:
    """Keyword arguments of ``cls`` from the parsed flags of its fields, with ``given`` on top.

    A required field's flag must be set (one line, ``--<flag> is required``); list flags become
    tuples of the field's item type (one line naming the flag on a bad item); a field marked
    ``unset_is_default`` is left out when its flag is not given.
    """
    out = {}
    for flag in config_flags(cls):
        if flag.field.name in given:
            continue
        if flag.field.metadata.get("unset_is_default") and not fv[flag.name].present:
            continue
        value = fv[flag.name].value
        if flag.required:
            require(**{flag.name: value})
        if flag.kind == "list":
            value = {int: int_list, float: float_list}.get(flag.item, lambda v, _: tuple(v))(
                value, flag.name
            )
        out[flag.field.name] = value
    return {**out, **given}


def define_binary_flags(
    configs: Sequence[type], own: Sequence[str] = (), fv: flags.FlagValues = FLAGS
) -> None:
    """Defines a binary's flags: its configs' fields and its own switches (``OWN_FLAGS``)."""
    define_config_flags(*configs, fv=fv)
    define_flags(*own, fv=fv)


def define_flags(*names: str, fv: flags.FlagValues = FLAGS) -> None:
    """Defines the flags of the binaries that are no config field (``--smoke``, ``--merge``...)."""
    for name in names:
        kind, default, help_text = OWN_FLAGS[name]
        _define(kind, name, default, help_text, fv)


# The binaries' own switches: not settings of a library config (they choose what a binary does).
OWN_FLAGS = {
    "smoke": (
        "bool",
        False,
        "Shrink everything to run in seconds (tiny net and data, 2 epochs of 2 steps).",
    ),
    "compare": ("list", [], "Evaluation folders (with metrics.json) to put in one table."),
    "names": ("list", [], "Row names of --compare (default the folder names)."),
    "compare_out": ("string", "comparison", "Path prefix of the comparison table (.md and .csv)."),
    "target_mag": ("float", 0.0, "Instead of --target_mpp: magnification, 10x = 1.0 µm/px."),
    "merge": (
        "bool",
        False,
        "Only merge the finished tasks' parts: into shards + dataset.json (convert), into the "
        "cohort's tables (predict: needs only --out_dir).",
    ),
    "out_dir": ("string", "", "Demo folder (default runs/demo, where flags/demo/*.flags point)."),
}


def float_list(values: Sequence[str], name: str) -> tuple[float, ...]:
    """A list flag of numbers, with a one-line error naming the flag."""
    try:
        numbers = tuple(float(v) for v in values)
    except ValueError:
        raise ValueError(
            f"--{name} takes numbers separated by commas, got {','.join(values)}"
        ) from None
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError(f"--{name} takes finite numbers, got {','.join(values)}")
    return numbers


def int_list(values: Sequence[str], name: str) -> tuple[int, ...]:
    """A list flag of integers, with a one-line error naming the flag."""
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(
            f"--{name} takes integers separated by commas, got {','.join(values)}"
        ) from None


def require(**values) -> None:
    """Raises a one-line error for the first required flag that is unset."""
    for name, value in values.items():
        if value in (None, "", []):
            raise ValueError(f"--{name} is required")


_TYPED: list[str] = []  # the arguments of the command line as typed (not from a --flagfile)


def _unexpected(rest: Sequence[str]) -> str:
    """The error for arguments that are no --flags: the first one only, and only if it was typed
    on the command line (a --flagfile's lines, or a file it includes, may hold secrets)."""
    more = f" (and {len(rest) - 1} more)" if len(rest) > 1 else ""
    if rest[0] in _TYPED:
        first = rest[0] if len(rest[0]) <= 80 else rest[0][:77] + "..."
        return f"unexpected argument {first!r}{more}; all options are --flags"
    return (
        f"a --flagfile (or a file it includes) has {len(rest)} line(s) that are no --flags (not "
        "shown); every line of a flagfile must be --name=value"
    )


def _parser(prog: str) -> Callable[[list[str]], list[str]]:
    def parse(argv: list[str]) -> list[str]:
        _TYPED[:] = argv[1:]
        log_as(prog)
        try:
            rest = FLAGS(argv)
        except flags.Error as e:  # absl names the flag, and at most the offending --flag=value
            print(f"{prog}: error: {(str(e).splitlines() or [''])[0]}", file=sys.stderr)
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
                _LOG.error(f"error: --{name} must be a finite number, got {value}")
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
    errno.EFBIG: "a file size limit was reached (ulimit -f, or the file system's): raise it or "
    "free "
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


def fail(prog: str, message: str, code: int = EXIT_BAD_INPUT) -> typing.NoReturn:
    """Ends the binary with ``<prog>: error: <first line of message>`` on stderr and ``code``."""
    print(f"{prog}: error: {(message.splitlines() or [''])[0]}", file=sys.stderr)
    sys.exit(code)


def guarded(prog: str, main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Wraps ``main`` so bad input ends in ``<prog>: error: ...`` and exit code 2, and Ctrl-C in
    ``<prog>: interrupted; rerun the same command to resume`` and exit code 130.

    Bad input is a ``ValueError`` (the library's refusals), a file that is missing or not
    readable, any other ``OSError`` (a file in the way of a folder, a full disk, a file size
    limit) and TensorFlow's runtime errors (``tf.errors.OpError``: a corrupt shard, a failed
    write): each is one line, never a traceback.
    """

    def wrapped(argv: list[str]) -> None:
        if len(argv) > 1:
            fail(prog, _unexpected(argv[1:]))
        try:
            main(argv)
        except KeyboardInterrupt:  # Ctrl-C: finished work is kept, as after a kill
            print(f"{prog}: {INTERRUPTED}", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        except BAD_INPUT as e:
            fail(prog, str(e).splitlines()[0] if str(e) else type(e).__name__)
        except OSError as e:
            fail(prog, _os_error_line(e))
        except Exception as e:
            if isinstance(e, _tf_op_error()):
                fail(prog, _tf_error_line(e))
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


def entry_point(prog: str, main: Callable[[list[str]], None]) -> Callable[[], None]:
    """The console-script entry of a binary (``setup.cfg``: ``kd_histo.cli.<binary>:run``)."""
    return functools.partial(run, prog, main)


def print_file(path: str) -> None:
    """Prints a text file the binary wrote (a results table) as it stands."""
    with open(path) as f:
        print(f.read(), end="")


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
