"""The kd-histo-predict process that test_cohort.py kills with SIGKILL (not a test module).

    python predict_child.py <ready file> <module>:<function>,<call>[,half] -- <predict flags>

Runs kd-histo-predict with ``<module>.<function>`` (e.g. ``kd_histo.evaluation.cohort:write_part``,
or ``kd_histo.evaluation.cohort:shutil.copyfileobj``) wrapped: at its ``<call>``-th call (from 1)
the process writes ``<ready file>`` and sleeps, for the parent to kill it there; with ``half``
(a ``copyfileobj(src, dst)``) it first copies half of the data into the file being written, so the
kill leaves a half-written temporary file. ``-`` instead of a function: no hang.
"""

from __future__ import annotations

import importlib
import sys
import time

from kd_histo.cli import predict as predict_cli


def _hang(ready: str) -> None:
    with open(ready, "w") as f:
        f.write("ready")
    time.sleep(600)  # the parent kills this process here


def _wrap(where: str, at: int, half: bool, ready: str) -> None:
    module, _, dotted = where.partition(":")
    target = importlib.import_module(module)
    *owners, name = dotted.split(".")
    for owner in owners:
        target = getattr(target, owner)
    original = getattr(target, name)
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            if half:
                src, dst = args[:2]
                data = src.read()
                dst.write(data[: len(data) // 2])
                dst.flush()
            _hang(ready)
        return original(*args, **kwargs)

    setattr(target, name, wrapped)


def main(ready: str, hang: str, argv: list[str]) -> int:
    if hang != "-":
        name, at, *rest = hang.split(",")
        _wrap(name, int(at), rest == ["half"], ready)
    from kd_histo.cli import flags_common as fc

    return fc.invoke(predict_cli.PROG, predict_cli.main, argv)


if __name__ == "__main__":
    split = sys.argv.index("--")
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[split + 1 :]))
