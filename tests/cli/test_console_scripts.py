"""The installed console scripts start, and ``--help`` lists each binary's own flags."""

import configparser
import os
import pathlib
import subprocess
import sys

import pytest
from support import REPO


def _console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


# A flag each binary must show in --help (one of its own, not absl's).
OWN_FLAG = {
    "kd-histo-convert": "--tile_px",
    "kd-histo-train": "--teacher",
    "kd-histo-evaluate": "--n_boot",
    "kd-histo-cost": "--batch_sizes",
    "kd-histo-predict": "--[no]heatmap",
    "kd-histo-experiment": "--unlabeled_fractions",
    "kd-histo-demo": "--out_dir",
    "kd-histo-export": "--quantize",
}


def test_every_console_script_has_an_expected_flag():
    assert set(_console_scripts()) == set(OWN_FLAG)


@pytest.mark.parametrize("script", sorted(OWN_FLAG))
def test_help_lists_the_binarys_flags(script):
    exe = pathlib.Path(sys.executable).parent / script
    if not exe.exists():
        pytest.skip(f"{exe} is not installed (run `make venv`)")
    proc = subprocess.run(
        [str(exe), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    # absl ends --help with exit status 1; what matters is that the binary's flags are listed.
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert OWN_FLAG[script] in proc.stdout, proc.stdout[-2000:]
