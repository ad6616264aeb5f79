"""The README's commands stay true: its two commands, CI, and every flag and flagfile it names."""

import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BINARIES = ("convert", "train", "evaluate", "cost", "predict", "experiment", "demo")


def _commands():
    """Every kd-histo-* / tools/*.py command of the README's bash blocks (continuations joined)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.search(r"(kd-histo-\w+|tools/\w+\.py)\s.*", line)
            if m:
                out.append(m.group(0).split(";")[0].split("&&")[0])
    return out


def test_the_two_commands_and_ci():
    assert "make demo" in README and "make test" in README
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: venv$", make, re.M) and re.search(r"^test: venv lint$", make, re.M)
    ci = [
        ln
        for ln in (ROOT / ".ci" / "run").read_text().splitlines()
        if ln and not ln.startswith(("#", "set ", "cd "))
    ]
    assert ci == ["make test"]


def test_readme_commands_name_real_flags_and_flagfiles():
    from kd_histo.cli import flags_common as fc

    for b in BINARIES:  # defines every binary's flags in this process
        __import__(f"kd_histo.cli.{b}")
    commands = _commands()
    assert len(commands) >= 15, commands
    tool_flags = {  # the flags tools/*.py define (each is its own absl program)
        m
        for t in (ROOT / "tools").glob("*.py")
        for m in re.findall(r'DEFINE_\w+\(\s*"(\w+)"', t.read_text())
    }
    assert {"folders", "splits", "out", "pair"} <= tool_flags
    for cmd in commands:
        for tok in shlex.split(cmd.replace("$run", "x")):
            if not tok.startswith("--"):
                continue
            name = tok[2:].split("=", 1)[0]
            if name.startswith("no") and name[2:] in fc.FLAGS:
                name = name[2:]
            known = (
                name in fc.FLAGS
                or name == "flagfile"
                or (cmd.startswith("tools/") and name in tool_flags)
            )
            assert known, f"README: {cmd!r} uses unknown flag --{name}"
            if name == "flagfile":
                assert (ROOT / tok.split("=", 1)[1]).is_file(), tok


@pytest.mark.parametrize("binary", BINARIES)
def test_every_binary_is_shown(binary):
    assert f"kd-histo-{binary}" in README


def test_readme_python_blocks_run():
    """The README's Python examples import what they name (the package layout they document)."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
