"""Conversion under failure: two writers of one folder, and a crash in the merge phase.

Also proven elsewhere (marked ``reliability``): tests/convert/test_convert.py
(``test_kill_9_midway_then_rerun_gives_identical_output``: SIGKILL of the binary while it writes
part files, then a rerun gives byte-identical shards; ``test_lock_refuses_a_second_live_writer_and
_takes_over_a_dead_ones``: the lock file itself).
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from support import small_units_command as _cli
from support import small_units_config as _cfg

from kd_histo import schema
from kd_histo.convert import ConversionError, convert, writer
from kd_histo.data import synthetic

from .helpers import REPO

pytestmark = pytest.mark.reliability


def _shards(data_dir) -> dict[str, bytes]:
    """Every shard's bytes and dataset.json without its command line."""
    out = {}
    for name in sorted(os.listdir(data_dir)):
        if name.endswith(".tfrecord"):
            with open(os.path.join(data_dir, name), "rb") as f:
                out[name] = f.read()
    info = schema.DatasetInfo.read(str(data_dir)).to_dict()
    info.pop("command")
    out["dataset.json"] = json.dumps(info, sort_keys=True).encode()
    return out


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """A manifest of 160 tiles and its conversion done in one go (the reference)."""
    root = tmp_path_factory.mktemp("conv")
    manifest = synthetic.write_tile_folder(str(root / "src"), 40, tile_px=32, slides_per_class=20)
    convert(_cfg(root / "ref", manifest))
    return manifest, _shards(root / "ref")


def _refusal(pid, out):
    return (
        f"another kd-histo-convert (pid {pid} on {socket.gethostname()}) is writing {out}; "
        f"wait for it, or delete {os.path.join(out, '.lock-convert')} if it is dead"
    )


def test_second_run_into_the_same_folder_is_refused_while_the_first_writes(tiles, tmp_path):
    manifest, reference = tiles
    out = str(tmp_path / "out")
    first = subprocess.Popen(
        _cli(manifest, out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    lock = os.path.join(out, ".lock-convert")
    deadline = time.time() + 120
    while not os.path.exists(lock):
        assert first.poll() is None, (
            f"the first run ended before the test saw its lock: {first.stderr.read()}"
        )
        assert time.time() < deadline, "the first run never took its lock"
        time.sleep(0.01)
    with pytest.raises(ConversionError) as err:
        convert(_cfg(out, manifest))
    assert str(err.value) == _refusal(first.pid, out)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert _shards(out) == reference  # the refused run changed nothing: no interleaving
    assert not os.path.exists(lock)


def test_cli_refuses_a_folder_locked_by_a_live_process_in_one_line(tiles, tmp_path, capsys):
    from kd_histo.cli import convert as cli
    from kd_histo.cli import flags_common as fc

    manifest, _ = tiles
    out = str(tmp_path / "out")
    os.makedirs(out)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with open(os.path.join(out, ".lock-convert"), "w") as f:
            json.dump({"pid": holder.pid, "host": socket.gethostname(), "time": time.time()}, f)
        argv = _cli(manifest, out)[3:]
        assert fc.invoke(cli.PROG, cli.main, argv) == 2
        assert (
            capsys.readouterr().err.strip()
            == f"kd-histo-convert: error: {_refusal(holder.pid, out)}"
        )
        assert os.listdir(out) == [".lock-convert"]  # nothing else was written
    finally:
        holder.kill()
        holder.wait()


class _Killed(BaseException):
    """Stands in for SIGKILL: no ``except Exception`` handler runs."""


def test_crash_while_merging_then_rerun_gives_identical_shards(tiles, tmp_path, monkeypatch):
    manifest, reference = tiles
    out = tmp_path / "out"
    real = writer.write_records_atomic
    shards_started = []

    def dies_in_the_second_shard(path, records, compression=""):
        try:
            schema.parse_shard_name(path)
        except schema.SchemaError:
            return real(path, records, compression)  # a part file of the task phase
        shards_started.append(path)
        if len(shards_started) == 2:
            with open(f"{path}.tmp-{os.getpid()}", "wb") as f:  # half-written, as a kill leaves it
                f.write(next(iter(records)))
            raise _Killed()
        return real(path, records, compression)

    monkeypatch.setattr(writer, "write_records_atomic", dies_in_the_second_shard)
    with pytest.raises(_Killed):
        convert(_cfg(out, manifest))
    monkeypatch.undo()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in ("convert", "merge"):  # a kill leaves its locks behind, owned by a dead pid
        with open(out / f".lock-{name}", "w") as f:
            json.dump({"pid": dead.pid, "host": socket.gethostname()}, f)
    left = sorted(os.listdir(out))
    assert "dataset.json" not in left and any(".tmp-" in n for n in left)
    convert(_cfg(out, manifest))
    assert _shards(out) == reference
    assert not [n for n in os.listdir(out) if ".tmp-" in n or n.startswith(".lock-")]
