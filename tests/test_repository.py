"""The repository stays small: nothing large is committed by accident (a stray 11 MB wheel was once
most of .git). Results and test fixtures may be large; anything else over 1 MB is listed."""

import shutil
import subprocess

import pytest
from support import REPO

LIMIT_BYTES = 1 << 20
ALLOWED_PREFIXES = ("results/", "tests/fixtures/")


def _tracked_files():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: no tracked files to list")
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    return [p for p in out.split("\0") if p]


def test_no_large_file_is_tracked_outside_results_and_fixtures():
    files = _tracked_files()
    assert "setup.cfg" in files  # the listing is the real one
    large = [
        f"{p} ({(REPO / p).stat().st_size / 1e6:.1f} MB)"
        for p in files
        if not p.startswith(ALLOWED_PREFIXES)
        and (REPO / p).is_file()
        and (REPO / p).stat().st_size > LIMIT_BYTES
    ]
    assert not large, f"tracked files over 1 MB: {large}; were they meant to be committed?"


def test_wheels_and_archives_are_ignored():
    ignore = (REPO / ".gitignore").read_text().splitlines()
    assert "*.whl" in ignore


# Tests mirror the package: each lives in the folder of the kd_histo subpackage it tests
# (tests/training/, tests/evaluation/, ...). Only these look at the repository as a whole.
REPOSITORY_WIDE_TESTS = {
    "test_code_size.py",  # every module and function of kd_histo/
    "test_imports.py",  # the layer order of all subpackages
    "test_install.py",  # the installed distribution and its environment
    "test_readme.py",  # README.md's commands and tables
    "test_repository.py",  # what git tracks and ignores
}


def test_tests_mirror_the_package():
    tests = REPO / "tests"
    loose = sorted(p.name for p in tests.glob("test_*.py"))
    assert set(loose) <= REPOSITORY_WIDE_TESTS, (
        f"move {sorted(set(loose) - REPOSITORY_WIDE_TESTS)} into the tests/<subpackage>/ folder "
        "of the kd_histo subpackage they test"
    )
    # Every test folder is a package, so two folders may hold test files of the same name.
    folders = {p.parent for p in tests.rglob("test_*.py")} - {tests}
    missing = sorted(str(d.relative_to(REPO)) for d in folders if not (d / "__init__.py").exists())
    assert not missing, f"add an empty __init__.py to {missing}"
