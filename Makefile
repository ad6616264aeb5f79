# One environment in .venv/ at the repository root; `make demo` and `make test` build on it.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# Which TensorFlow build .venv holds: `cpu` (the default, tensorflow-cpu) or `gpu`
# (tensorflow[and-cuda]: `make venv-gpu`); remembered in .venv/.tf-build, so a rebuild keeps it.
TF_BUILD ?= $(shell cat $(VENV)/.tf-build 2>/dev/null || echo cpu)
# tensorflow and tensorflow-cpu install the same files: never both. Switching builds removes both
# first, then installs the wanted one (see BUILD_NOTES.md, "The tested environment").
TF_OTHER = $(if $(filter gpu,$(TF_BUILD)),tensorflow-cpu,tensorflow)

.PHONY: venv venv-cpu venv-gpu demo test lint test-reliability clean-venv

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml requirements/constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade "pip>=24"
	if $(VENV)/bin/python -m pip show --quiet $(TF_OTHER) >/dev/null 2>&1; then \
	  $(VENV)/bin/python -m pip uninstall -qq --yes tensorflow tensorflow-cpu; fi
	$(VENV)/bin/python -m pip install --quiet -c requirements/constraints.txt -e ".[$(TF_BUILD),test]"
	$(VENV)/bin/python tools/check_env.py --tf_build=$(TF_BUILD)
	echo $(TF_BUILD) > $(VENV)/.tf-build
	touch $(STAMP)

# Switch .venv to the CPU-only (default) or the CUDA TensorFlow build.
venv-cpu venv-gpu:
	rm -f $(STAMP)
	$(MAKE) venv TF_BUILD=$(@:venv-%=%)

# The main job: synthetic H&E-like data -> shards -> teacher, baselines, students -> report.
demo: venv
	$(VENV)/bin/kd-histo-demo --out_dir=runs/demo

# Lint first (seconds), then the suite: CI runs exactly this.
test: venv lint
	$(VENV)/bin/python -m pytest -n 2 --durations=15

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-reliability: venv
	$(VENV)/bin/python -m pytest -m reliability -n 2

clean-venv:
	rm -rf $(VENV)
