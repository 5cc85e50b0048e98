# Quick start: `make run` (demo / main job) and `make test` (lint + tests).
# Both create .venv on first use and install everything attn_jax needs.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STAMP_TEST := $(VENV)/.installed-test
PYTEST_WORKERS ?= 2

.PHONY: run test test-slow test-kernels lint format bench bench-quick device-check readme clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) setup.py
	$(PY) -m pip install --quiet -e .
	touch $@

$(STAMP_TEST): $(STAMP) setup.py
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# The main job: train small MQAR models with several attention mechanisms on this machine
# (about 10 minutes on 2 CPU cores); prints the results table, writes runs/mqar_demo/<run>/
# and experiments/results/mqar_demo.{md,json,png}. Finished runs are reused on a rerun.
run: $(STAMP)
	$(PY) experiments/mqar_sweep.py --preset=demo

SOURCES := attn_jax pallas_kernels experiments configs tests setup.py

lint: $(STAMP_TEST)
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/ruff format --check $(SOURCES)

format: $(STAMP_TEST)
	$(VENV)/bin/ruff format $(SOURCES)
	$(VENV)/bin/ruff check --fix $(SOURCES)

test: lint
	$(PY) -m attn_jax.registry --check-readme README.md
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -p no:cacheprovider --durations=25

test-slow: $(STAMP_TEST)
	$(PY) -m pytest -q -m slow -p no:cacheprovider

# The large interpret-mode grids of the Pallas flash kernels (TPU and GPU), with lowering.
test-kernels: $(STAMP_TEST)
	$(PY) -m pytest -q -m slow -n $(PYTEST_WORKERS) -p no:cacheprovider tests/test_flash_tpu.py tests/test_flash_gpu.py

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) experiments/bench_attention.py

bench-quick: $(STAMP)
	$(PY) experiments/bench_attention.py --quick

# On a lent GPU / TPU machine, with that machine's own Python and jax (nothing installed):
# the Pallas kernels compiled, checked against float64 oracles and timed, in one run that
# fits a short lease (experiments/device_check.py; results in $OUT when set).
DEVICE_PYTHON ?= python3
device-check:
	PYTHONPATH=. PYTHONUNBUFFERED=1 $(DEVICE_PYTHON) experiments/device_check.py \
		--out=$${OUT:-experiments/results/device_check}

readme: $(STAMP)
	$(PY) -m attn_jax.registry --write-readme README.md

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
