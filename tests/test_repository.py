"""The repository stays small: nothing large is committed by accident (a stray 11 MB wheel was once
most of .git). Results and test fixtures may be large; anything else over 1 MB is listed."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIMIT_BYTES = 1 << 20
ALLOWED_PREFIXES = ("results/", "tests/fixtures/")


def _tracked_files():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no tracked files to list")
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    return [p for p in out.split("\0") if p]


def test_no_large_file_is_tracked_outside_results_and_fixtures():
    files = _tracked_files()
    assert "setup.cfg" in files  # the listing is the real one
    large = [
        f"{p} ({(ROOT / p).stat().st_size / 1e6:.1f} MB)"
        for p in files
        if not p.startswith(ALLOWED_PREFIXES)
        and (ROOT / p).is_file()
        and (ROOT / p).stat().st_size > LIMIT_BYTES
    ]
    assert not large, f"tracked files over 1 MB: {large}; were they meant to be committed?"


def test_wheels_and_archives_are_ignored():
    ignore = (ROOT / ".gitignore").read_text().splitlines()
    assert "*.whl" in ignore
