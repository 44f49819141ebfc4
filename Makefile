# ood: the front door. `make help` lists the targets.
VENV ?= .venv
PY := $(VENV)/bin/python
SEEDS ?= 0,1,2
# reproduce-* and digits-energy: where the sweeps go; torchvision's ResNet-50 IMAGENET1K_V1 file (reproduce-grood's ImageNet-1K part)
R ?= logs/reproduce
WEIGHTS ?= $(HOME)/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth
IMAGENET_ARGS ?=
REPORT_ARGS ?=
# reproduce-*: RESUME=1 (not 0, no, false) re-runs a target into the same R= resuming each training job's last.ckpt (a finished job is
# only evaluated again); without it every job trains anew over the old one
RESUME ?=
TRAIN_RESUME = $(if $(filter-out 0 no No NO false False FALSE,$(RESUME)), ckpt_path=last)
# reproduce-*: DATA_DIR=<folder> given on the command line or in the environment sets paths.data_dir of every
# ood-train / ood-eval (else ood's own default: $OOD_DATA_DIR, or ./data); parity-openood reads its files there too
DATA_DIR ?= $(or $(OOD_DATA_DIR),data)
DATA_ARG = $(if $(filter command line environment,$(origin DATA_DIR)), paths.data_dir=$(DATA_DIR))
# one job folder per (data, backbone, seed): a second stage finds the first stage's checkpoint under the same name
JOB = $${hydra:runtime.choices.data}-$${hydra:runtime.choices.backbone}-s$${seed}
LAST = checkpoints/last.ckpt
BEST = checkpoints/best.ckpt

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint format bench reproduce-cifar10 reproduce-cifar100 reproduce-heatmap \
	reproduce-energy reproduce-cluster reproduce-grood reproduce-oal digits-energy gpu-check gpu-wheels parity-openood clean

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# no byte-compiling of everything installed (pip's serial step: 89 s -> 48 s; compileall on 2 cores took 24 s more):
	# Python compiles the modules a program imports on first import and keeps them (`make test`'s first imports: 4 s),
	# unless PYTHONDONTWRITEBYTECODE is set (as on our build machines): `make test` and `make test-fast` unset it for their run
	$(PY) -m pip install --no-compile -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## create .venv (if missing) and install ood with the dev extras

demo: install ## train + evaluate the CE baseline on the embedded digits benchmark (CPU, ~1 min), print the table
	$(VENV)/bin/ood-train

test: install ## the layer contract (import-linter), then the whole test suite on 2 processes (what CI runs)
	$(VENV)/bin/lint-imports
	# every process of the suite keeps the bytecode it compiles for the next: with PYTHONDONTWRITEBYTECODE set, each
	# of its subprocesses compiled torch, lightning and hydra again from source (9 s a process; a fresh clone's
	# `make test` on a 2-core host: 8:10 and 9:33 before, 7:10 after)
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-fast: install ## the suite without the slow end-to-end tests
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q -m "not slow"

lint: install ## ruff, and the layer contract (import-linter, [tool.importlinter] in pyproject.toml)
	$(PY) -m ruff check ood hydra_plugins tests benchmarks
	$(VENV)/bin/lint-imports

format: install ## ruff format + import sorting
	$(PY) -m ruff check --fix --select I ood hydra_plugins tests benchmarks
	$(PY) -m ruff format ood hydra_plugins tests benchmarks

bench: install ## speed benchmarks (benchmarks/): metrics, detectors, one pass vs many, end-to-end vs OpenOOD's evaluator loop
	$(PY) -m benchmarks.run

reproduce-cifar10: install ## OpenOOD v1.5 CE baseline on CIFAR-10: ResNet-18, 100 epochs, seeds 0,1,2 (SEEDS=...), one GPU, then the table beside the leaderboard (extra overrides: ARGS="paths.data_dir=...")
	# 1/2 train + evaluate: OpenOOD v1.5 CE, ResNet-18 32x32, 100 epochs, one job per seed -> $(R)/cifar10/<job number>
	$(VENV)/bin/ood-train -m experiment=cifar10_ce seed=$(SEEDS) hydra.sweep.dir=$(R)/cifar10$(TRAIN_RESUME)$(DATA_ARG) $(ARGS)
	# 2/2 report beside the OpenOOD v1.5 leaderboard (conf/reference/cifar10.yaml, read by ID dataset) -> $(R)/cifar10/report.md
	$(VENV)/bin/ood-report $(R)/cifar10 $(REPORT_ARGS)

reproduce-cifar100: install ## the same on CIFAR-100 (`make -n reproduce-cifar100` shows the commands)
	# 1/2 train + evaluate: OpenOOD v1.5 CE, ResNet-18 32x32, 100 epochs, one job per seed -> $(R)/cifar100/<job number>
	$(VENV)/bin/ood-train -m experiment=cifar100_ce seed=$(SEEDS) hydra.sweep.dir=$(R)/cifar100$(TRAIN_RESUME)$(DATA_ARG) $(ARGS)
	# 2/2 report beside the OpenOOD v1.5 leaderboard (conf/reference/cifar100.yaml, read by ID dataset) -> $(R)/cifar100/report.md
	$(VENV)/bin/ood-report $(R)/cifar100 $(REPORT_ARGS)

# Paper tables (conf/experiment/<preset>.yaml, references in conf/reference/<paper>/). Sweep axes are variables
# (DATA=, BACKBONES=, SEEDS=); ARGS= is appended to every training / evaluation command (e.g. ARGS="paths.data_dir=/data"),
# REPORT_ARGS= to every ood-report (e.g. REPORT_ARGS="--detectors msp,knn", or --no-figures).
reproduce-heatmap: DATA = cifar10,cifar100
reproduce-heatmap: BACKBONES = resnet18_32x32,wrn40_2_heatmap
reproduce-heatmap: install ## heatmap paper: CE classifiers, then heatmap decoders on them (classic CIFAR sets), report beside FlowCon's table
	# 1/3 train + evaluate: CE classifiers, classic OOD sets -> $(R)/heatmap/ce/<data>-<backbone>-s<seed>
	$(VENV)/bin/ood-train -m experiment=heatmap_ce data=$(DATA) backbone=$(BACKBONES) seed=$(SEEDS) hydra.sweep.dir=$(R)/heatmap/ce hydra.sweep.subdir='$(JOB)'$(TRAIN_RESUME)$(DATA_ARG) $(ARGS)
	# 2/3 train + evaluate: heatmap decoders on stage 1's last.ckpt of the same job name -> $(R)/heatmap/heatmap/<data>-<backbone>-s<seed>
	$(VENV)/bin/ood-train -m experiment=heatmap data=$(DATA) backbone=$(BACKBONES) seed=$(SEEDS) hydra.sweep.dir=$(R)/heatmap/heatmap hydra.sweep.subdir='$(JOB)' '++method.init.ckpt=$(R)/heatmap/ce/$(JOB)/$(LAST)'$(TRAIN_RESUME)$(DATA_ARG) $(ARGS)
	# 3/3 report beside FlowCon's table (conf/reference/heatmap) -> $(R)/heatmap/report.md
	$(VENV)/bin/ood-report $(R)/heatmap --reference conf/reference/heatmap $(REPORT_ARGS)

reproduce-energy: DATA = cifar10,cifar100
reproduce-energy: METHODS = energy_oe,energy_cfl,oe
reproduce-energy: install ## energy / SDE papers: WRN-40-2 CE, then Energy-OE, SDE-CFL (reconstruction) and OE fine-tunes, report beside energy_ood's FPR95 table and outlier-exposure's released results
	# 1/3 train + evaluate: WRN-40-2 CE -> $(R)/energy/ce/<data>-<backbone>-s<seed>
	$(VENV)/bin/ood-train -m experiment=energy_ce data=$(DATA) seed=$(SEEDS) hydra.sweep.dir=$(R)/energy/ce hydra.sweep.subdir='$(JOB)'$(TRAIN_RESUME)$(DATA_ARG) $(ARGS)
	# 2/3 train + evaluate: fine-tunes $(METHODS) from stage 1's last.ckpt, 300K random images as outliers -> $(R)/energy/ft/<method>-<data>-<backbone>-s<seed>
	$(VENV)/bin/ood-train -m experiment=energy_ft method=$(METHODS) data=$(DATA) seed=$(SEEDS) hydra.sweep.dir=$(R)/energy/ft hydra.sweep.subdir='$${hydra:runtime.choices.method}-$(JOB)' '++method.init.ckpt=$(R)/energy/ce/$(JOB)/$(LAST)'$(TRAIN_RESUME)$(DATA_ARG) $(ARGS)
	# 3/3 report beside energy_ood's FPR95 table and outlier-exposure's released results (conf/reference/energy, oe) -> $(R)/energy/report.md
	$(VENV)/bin/ood-report $(R)/energy --reference conf/reference/energy --reference conf/reference/oe $(REPORT_ARGS)

reproduce-cluster: DATA = cifar10,cifar100
reproduce-cluster: CONTRASTIVE = supcon,simclr
reproduce-cluster: DISTANCES = euclidean,cosine,mahalanobis
reproduce-cluster: THRESHOLDS = global,per_cluster
reproduce-cluster: install ## cluster-game paper with OODformer's choices: CE, SupCon, SimCLR encoders, then the distance x threshold grid (no public numbers)
	# 1/4 train: CE encoders -> $(R)/cluster/train/ce-<data>-<backbone>-s<seed>
	$(VENV)/bin/ood-train -m experiment=cluster_oodformer data=$(DATA) seed=$(SEEDS) hydra.sweep.dir=$(R)/cluster/train hydra.sweep.subdir='ce-$(JOB)'$(TRAIN_RESUME)$(DATA_ARG) $(ARGS)
	# 2/4 train: $(CONTRASTIVE) encoders, 700 contrastive epochs + linear probe -> $(R)/cluster/train/<objective>-<data>-<backbone>-s<seed>
	$(VENV)/bin/ood-train -m experiment=cluster_oodformer method.objective=$(CONTRASTIVE) data=$(DATA) seed=$(SEEDS) data.batch_size=2048 method.optimizer.lr=0.5 trainer.max_epochs=800 method.scheduler.T_max=700 hydra.sweep.dir=$(R)/cluster/train hydra.sweep.subdir='$${method.objective}-$(JOB)'$(TRAIN_RESUME)$(DATA_ARG) $(ARGS)
	# 3/4 evaluate only: every encoder x distance ($(DISTANCES)) x threshold ($(THRESHOLDS)) -> $(R)/cluster/eval/<job number>
	$(VENV)/bin/ood-eval -m experiment=cluster_oodformer method.objective=ce,$(CONTRASTIVE) method.distance=$(DISTANCES) method.threshold=$(THRESHOLDS) data=$(DATA) seed=$(SEEDS) hydra.sweep.dir=$(R)/cluster/eval 'ckpt_path=$(R)/cluster/train/$${method.objective}-$(JOB)/$(LAST)'$(DATA_ARG) $(ARGS)
	# 4/4 report (no published numbers: conf/reference/cluster says why) -> $(R)/cluster/eval/report.md
	$(VENV)/bin/ood-report $(R)/cluster/eval --reference conf/reference/cluster $(REPORT_ARGS)

reproduce-grood: DATA = cifar10,cifar100
reproduce-grood: IMAGENET_SOURCES = synthetic_mixup,val_ood
reproduce-grood: install ## GROOD: OpenOOD CE + GROOD on CIFAR (mix-up and val-OOD prototypes), post-hoc on ImageNet-1K (WEIGHTS=resnet50 file), report beside GROOD's README (its OpenOOD v1.5 numbers)
	# 1/4 train + evaluate: OpenOOD CE recipe + GROOD, mix-up OOD prototype -> $(R)/grood/train/<data>-<backbone>-s<seed>
	$(VENV)/bin/ood-train -m experiment=grood_openood data=$(DATA) seed=$(SEEDS) hydra.sweep.dir=$(R)/grood/train hydra.sweep.subdir='$(JOB)'$(TRAIN_RESUME)$(DATA_ARG) $(ARGS)
	# 2/4 evaluate only: stage 1's networks with the val-OOD prototype -> $(R)/grood/val_ood/<job number>
	$(VENV)/bin/ood-eval -m experiment=grood_openood method.ood_proto_source=val_ood data=$(DATA) seed=$(SEEDS) hydra.sweep.dir=$(R)/grood/val_ood 'ckpt_path=$(R)/grood/train/$(JOB)'$(DATA_ARG) $(ARGS)
	# 3/4 evaluate only: ImageNet-1K on torchvision's ResNet-50 (WEIGHTS=), prototypes $(IMAGENET_SOURCES) -> $(R)/grood/imagenet1k/<job number>
	$(VENV)/bin/ood-eval -m experiment=grood_imagenet1k method.ood_proto_source=$(IMAGENET_SOURCES) backbone.weights=$(WEIGHTS) hydra.sweep.dir=$(R)/grood/imagenet1k$(DATA_ARG) $(IMAGENET_ARGS)
	# 4/4 report beside GROOD's README numbers and the leaderboard's CE detectors (conf/reference/grood, cifar10, cifar100) -> $(R)/grood/report.md
	$(VENV)/bin/ood-report $(R)/grood --reference conf/reference/grood --reference conf/reference/cifar10.yaml --reference conf/reference/cifar100.yaml $(REPORT_ARGS)

reproduce-oal: DATA = cifar10,cifar100
reproduce-oal: install ## OAL: OpenOOD CE students, then OAL fine-tuning, report beside the OpenOOD leaderboard
	# 1/3 train + evaluate: OpenOOD CE students -> $(R)/oal/ce/<data>-<backbone>-s<seed>
	$(VENV)/bin/ood-train -m experiment=openood_ce data=$(DATA) seed=$(SEEDS) hydra.sweep.dir=$(R)/oal/ce hydra.sweep.subdir='$(JOB)'$(TRAIN_RESUME)$(DATA_ARG) $(ARGS)
	# 2/3 train + evaluate: OAL fine-tuning from stage 1's best.ckpt (32 px, the method's small-CNN teacher) -> $(R)/oal/oal/<data>-<backbone>-s<seed>
	$(VENV)/bin/ood-train -m experiment=oal_openood data=$(DATA) seed=$(SEEDS) hydra.sweep.dir=$(R)/oal/oal hydra.sweep.subdir='$(JOB)' '++method.init.ckpt=$(R)/oal/ce/$(JOB)/$(BEST)'$(TRAIN_RESUME)$(DATA_ARG) $(ARGS)
	# 3/3 report beside the OpenOOD leaderboard (conf/reference/oal, cifar10, cifar100) -> $(R)/oal/report.md
	$(VENV)/bin/ood-report $(R)/oal --reference conf/reference/oal --reference conf/reference/cifar10.yaml --reference conf/reference/cifar100.yaml $(REPORT_ARGS)

digits-energy: install ## the energy family on digits: ce(+energy), logitnorm, energy_oe, energy_cfl_recon over SEEDS, then the table
	$(VENV)/bin/ood-train -m experiment=digits_energy method=ce,logitnorm seed=$(SEEDS) hydra.sweep.dir=$(R)/digits_energy $(ARGS)
	$(VENV)/bin/ood-train -m experiment=digits_energy method=energy_oe,energy_cfl seed=$(SEEDS) trainer.max_epochs=10 \
	  hydra.sweep.dir=$(R)/digits_energy 'method.init.ckpt=$(R)/digits_energy/ce_s$${seed}/$(LAST)' $(ARGS)
	$(VENV)/bin/ood-report $(R)/digits_energy $(REPORT_ARGS)

gpu-check: install ## on a CUDA machine (optionally pip uninstall faiss-cpu, pip install faiss-gpu-cu12 first): every CUDA path, synthetic data, sized for 8 min (never timed on a GPU yet; a first, shorter try: ARGS="--methods ce,cluster"), JSON in gpu_check.json; exits 1 on a failure
	$(PY) -m benchmarks.gpu_check --out gpu_check.json $(ARGS)

# A CUDA machine without internet whose image has PyTorch, Lightning, torchmetrics, scikit-learn, pandas and matplotlib
# (most CUDA images do) lacks only these: their wheels, at this venv's versions, for Python PYVER, into WHEELS
PYVER ?= 3.12
WHEELS ?= .whl
gpu-wheels: install ## wheels of hydra-core, omegaconf, antlr4 and faiss-cpu (PYVER=3.12) into .whl/ for an offline CUDA machine (see benchmarks/gpu_check.py)
	mkdir -p $(WHEELS)
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version $(PYVER) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $(WHEELS) \
	  $$($(PY) -m pip freeze | grep -iE '^(hydra-core|omegaconf|faiss-cpu)==')
	$(PY) -m pip wheel --no-deps -w $(WHEELS) $$($(PY) -m pip freeze | grep -i '^antlr4-python3-runtime==')

# OpenOOD v1.5's released checkpoints and benchmark lists (local files, never downloaded): DATA_DIR holds
# benchmark_imglist/ + images_classic/ + images_largescale/, CKPT_DIR the unzipped checkpoint folders, WEIGHTS the
# torchvision ResNet-50 file. BENCHMARKS= picks a subset (cifar10,cifar100,imagenet200,imagenet1k).
CKPT_DIR ?= results
BENCHMARKS ?= cifar10,cifar100,imagenet200,imagenet1k
parity-openood: install ## evaluate OpenOOD v1.5's checkpoints with every post-hoc detector, table beside the leaderboard's near/far AUROC (one GPU)
	$(PY) -m benchmarks.parity_openood --data-dir $(DATA_DIR) --ckpt-dir $(CKPT_DIR) --weights $(WEIGHTS) --benchmarks $(BENCHMARKS) --out $(R)/parity $(ARGS)

clean: ## remove run outputs (not the venv)
	rm -rf logs outputs multirun .pytest_cache
