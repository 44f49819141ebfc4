# ood: the front door. `make help` lists the targets.
VENV ?= .venv
PY := $(VENV)/bin/python
SEEDS ?= 0,1,2

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint format bench reproduce-cifar10 reproduce-cifar100 clean

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## create .venv (if missing) and install ood with the dev extras

demo: install ## train + evaluate the CE baseline on the embedded digits benchmark (CPU, ~1 min), print the table
	$(VENV)/bin/ood-train

test: install ## the whole test suite (what CI runs)
	$(PY) -m pytest -q

test-fast: install ## the suite without the slow end-to-end tests
	$(PY) -m pytest -q -m "not slow"

lint: install ## ruff
	$(PY) -m ruff check ood tests benchmarks

format: install ## ruff format + import sorting
	$(PY) -m ruff check --fix --select I ood tests benchmarks
	$(PY) -m ruff format ood tests benchmarks

bench: install ## speed benchmarks (benchmarks/): metrics, detectors, one pass vs many
	$(PY) -m benchmarks.run

clean: ## remove run outputs (not the venv)
	rm -rf logs outputs multirun .pytest_cache
