"""The README's commands stay true: its two commands, CI, and every flag and flagfile it names."""

import re
import shlex

import pytest
from support import REPO

README = (REPO / "README.md").read_text()
# The pages the README sends readers to for the long tables and the public data sets: their
# commands are held to the same standard as the README's own.
LINKED_DOCS = ("results/README.md", "docs/datasets.md", "docs/cohorts.md", "docs/other_sites.md")
BINARIES = ("convert", "train", "evaluate", "cost", "predict", "experiment", "demo")


def _commands(text=None):
    """Every kd-histo-* / tools/*.py command of the bash (and YAML: Kubernetes) blocks
    (continuations joined), in the README and the pages it links."""
    if text is None:
        return [
            c
            for t in (README, *((REPO / d).read_text() for d in LINKED_DOCS))
            for c in _commands(t)
        ]
    out = []
    for block in re.findall(r"```(?:bash|yaml)\n(.*?)```", text, re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.search(r"(kd-histo-\w+|tools/\w+\.py)\s.*", line)
            if m:
                out.append(m.group(0).split(";")[0].split("&&")[0])
    return out


def test_the_two_commands_and_ci():
    assert "make demo" in README and "make test" in README
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^demo: venv$", make, re.M) and re.search(r"^test: venv lint$", make, re.M)
    ci = [
        ln
        for ln in (REPO / ".ci" / "run").read_text().splitlines()
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
        for t in (REPO / "tools").glob("*.py")
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
                assert (REPO / tok.split("=", 1)[1]).is_file(), tok


@pytest.mark.parametrize("binary", BINARIES)
def test_every_binary_is_shown(binary):
    assert f"kd-histo-{binary}" in README


def test_readme_python_blocks_run():
    """The README's Python examples import what they name (the package layout they document)."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_readme_is_short_and_links_what_moved_out():
    lines = README.count("\n")
    assert lines < 250, f"README.md has {lines} lines; move detail to results/ or docs/"
    for doc in LINKED_DOCS:
        assert f"]({doc})" in README, f"README does not link {doc}"
    for section in (
        "## Two commands",
        "## Your own data",
        "## Working with QuPath",
        "## Outputs, and what opens them",
        "## Things worth knowing",
        "## Development",
    ):
        assert section in README, section


def _table_rows(text, header_start):
    """The body rows of the Markdown table whose header row starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header_start))
    rows = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append(ln)
    return rows


def test_readme_claims_table_is_the_committed_results():
    """The README's summary is the main run's claims table as the report wrote it, row for row."""
    header = "| factor | teacher | baseline | best label-free student |"
    committed = _table_rows((REPO / "results/lc25000_3seeds/results.md").read_text(), header)
    assert len(committed) == 3
    assert _table_rows(README, header) == committed


def test_outputs_section_names_every_file_the_binaries_write():
    """Each output file name the package writes by a literal name appears in the outputs table."""
    section = README.split("## Outputs, and what opens them", 1)[1].split("\n## ", 1)[0]
    written = set()
    for path in (REPO / "kd_histo").rglob("*.py"):
        written |= set(re.findall(r'"([a-z_]+\.(?:json|csv|png|md|keras))"', path.read_text()))
    internal = {  # bookkeeping files of the runner, the cache and the bundle, not for the user
        "experiment.json",
        "demo.json",
        "state.json",
        "cache.json",
        "built_for.json",
        "manifest.csv",
        "cascade.json",
        "tile_predictions.csv",
        "best.keras",
        "keys.txt",
        "done.json",  # predict's parts/<input>.done.json and .tiles.csv (the table: parts/)
        "tiles.csv",
    }
    read_only = {
        "teacher.json"
    }  # a foreign teacher's description: the user writes it, not kd_histo
    missing = sorted(n for n in written - internal - read_only if n not in section)
    assert not missing, f"README's outputs section does not name {missing}"
