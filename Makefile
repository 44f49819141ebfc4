# ood: the front door. `make help` lists the targets.
VENV ?= .venv
PY := $(VENV)/bin/python
SEEDS ?= 0,1,2

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint format bench reproduce-cifar10 reproduce-cifar100 digits-energy clean

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

reproduce-cifar10: install ## OpenOOD v1.5 CE baseline on CIFAR-10: ResNet-18, 100 epochs, seeds 0,1,2 (SEEDS=...), one GPU, then the table beside the leaderboard (extra overrides: ARGS="paths.data_dir=...")
	$(VENV)/bin/ood-train -m experiment=cifar10_ce seed=$(SEEDS) hydra.sweep.dir=logs/reproduce/cifar10 $(ARGS)
	$(VENV)/bin/ood-report logs/reproduce/cifar10

reproduce-cifar100: install ## the same on CIFAR-100 (`make -n reproduce-cifar100` shows the commands)
	$(VENV)/bin/ood-train -m experiment=cifar100_ce seed=$(SEEDS) hydra.sweep.dir=logs/reproduce/cifar100 $(ARGS)
	$(VENV)/bin/ood-report logs/reproduce/cifar100

digits-energy: install ## the energy family on digits: ce(+energy), logitnorm, energy_oe, energy_cfl_recon over SEEDS, then the table
	$(VENV)/bin/ood-train -m experiment=digits_energy method=ce,logitnorm seed=$(SEEDS) $(ARGS)
	$(VENV)/bin/ood-train -m experiment=digits_energy method=energy_oe,energy_cfl seed=$(SEEDS) trainer.max_epochs=10 \
	  'method.init.ckpt=logs/digits_energy/ce_s$${seed}/checkpoints/last.ckpt' $(ARGS)
	$(VENV)/bin/ood-report logs/digits_energy

clean: ## remove run outputs (not the venv)
	rm -rf logs outputs multirun .pytest_cache
