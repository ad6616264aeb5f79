# One environment in .venv/ at the repository root; `make demo` and `make test` build on it.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-reliability clean-venv

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml requirements/constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade "pip>=24"
	$(VENV)/bin/python -m pip install --quiet -c requirements/constraints.txt -e ".[test]"
	$(VENV)/bin/python tools/check_env.py
	touch $(STAMP)

# The main job: synthetic H&E-like data -> shards -> teacher, baselines, students -> report.
demo: venv
	$(VENV)/bin/kd-histo-demo --out_dir=runs/demo

test: venv
	$(VENV)/bin/python -m pytest -n 2 --durations=15

test-reliability: venv
	$(VENV)/bin/python -m pytest -m reliability -n 2

clean-venv:
	rm -rf $(VENV)
