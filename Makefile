# `make demo` and `make test` work on a fresh clone with only Python and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-gpu gpu-check lint format demo demo-full demo-text clean

install: $(STAMP)

# Re-install when the dependency list changes. Every extra the tests need is installed, so no
# test is skipped for a missing package.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[text,dev]"
	touch $(STAMP)

# lint-imports: the layers of mutor_vision/ ([tool.importlinter] in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q

# The GPU tier only (tests marked gpu: FlexAttention, bf16, compile, FSDP2, CUDA sampling, eval on CUDA).
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu -rs

# On a CUDA machine: the GPU tier and every GPU measure against its target, in one command
# (bench/gpu_check.py; results in bench/results/gpu_check_<device>.json). Without CUDA it lists
# the stages and exits. Where the packages are installed system-wide: make gpu-check PY=python3.
GPU_CHECK_ARGS ?=
gpu-check:
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

# The embedded demo: MuToR-2D vs next-token on scikit-learn's digits (16x16), 3 seeds, CPU, no downloads.
demo: $(STAMP)
	$(PY) demo/run_demo.py --out runs/demo

# The longer setting: 5 seeds x 19,200 steps (several times the default's time).
demo-full: $(STAMP)
	$(PY) demo/run_demo.py --full --out runs/demo-full

# The text demo: MuToR-1D vs next-token on a small local Llama, multi-step arithmetic, 3 seeds, CPU, offline.
demo-text: $(STAMP)
	$(PY) demo/run_demo_text.py --out runs/demo-text

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
