# Quick start: `make run` (demo / main job) and `make test` (lint + tests).
# Both create .venv on first use and install everything attn_jax needs.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STAMP_TEST := $(VENV)/.installed-test
PYTEST_WORKERS ?= 2

.PHONY: run test test-slow lint format bench readme clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) setup.py
	$(PY) -m pip install --quiet -e .
	touch $@

$(STAMP_TEST): $(STAMP) setup.py
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# Until the trainer lands, the main job is a short demo of the attention API: a small
# benchmark of every implementation (results in experiments/results/quick/).
run: $(STAMP)
	$(PY) experiments/bench_attention.py --quick

SOURCES := attn_jax pallas_kernels experiments configs tests setup.py

lint: $(STAMP_TEST)
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/ruff format --check $(SOURCES)

format: $(STAMP_TEST)
	$(VENV)/bin/ruff format $(SOURCES)
	$(VENV)/bin/ruff check --fix $(SOURCES)

test: lint
	$(PY) -m attn_jax.registry --check-readme README.md
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -p no:cacheprovider

test-slow: $(STAMP_TEST)
	$(PY) -m pytest -q -m slow -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) experiments/bench_attention.py

readme: $(STAMP)
	$(PY) -m attn_jax.registry --write-readme README.md

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
