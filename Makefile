# smml-lightning: every target installs into .venv first when it is missing.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXP ?= synthetic
OUT ?= runs/demo
ARGS ?=
# OpenMP threads spin briefly at barriers, then sleep (see src/smml_lightning/__init__.py).
export GOMP_SPINCOUNT ?= 10000
# glibc backs large allocations (3D activations: hundreds of MB) with transparent huge pages: far fewer
# page faults and a faster CPU training step (docs/benchmarks.md).
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: install lint test demo train sweep bench quality freeze clean

$(BIN)/smml: setup.cfg constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/smml ## make .venv and install the package editable with dev extras

lint: $(BIN)/smml ## ruff and mypy as configured in pyproject.toml (what .ci/run checks before the tests)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

test: $(BIN)/smml ## the whole test suite (CPU, a few minutes)
	$(BIN)/python -m pytest -n 2 $(ARGS)

demo: $(BIN)/smml ## main job on the embedded default: 24 full-size anatomy cases -> prepare at 3 mm -> priors -> fit -> 15-subset test on the 1 mm grid (about 11 min on 2 cores)
	$(BIN)/smml demo --out $(OUT) $(ARGS)

train: $(BIN)/smml ## fit one experiment into runs/<EXP>/<time>/: make train EXP=brats2018 [ARGS="--trainer.max_epochs=5"]
	$(BIN)/smml fit --config $(EXP) $(ARGS)

sweep: $(BIN)/smml ## run a W&B sweep file locally (offline), then rank the runs: make sweep [SWEEP=mask_ratio|path]
	$(BIN)/smml sweep $(or $(SWEEP),mask_ratio) $(ARGS)

bench: $(BIN)/smml ## speed benchmarks, ratios side by side
	$(BIN)/python benchmarks/speed.py $(ARGS)

quality: $(BIN)/smml ## quality benchmark: methods x regions over the 15 subsets
	$(BIN)/python benchmarks/quality.py $(ARGS)

freeze: ## regenerate the pinned constraints from the current .venv
	{ echo '# Exact versions `make install` resolves (pip -c constraints.txt). Regenerate with `make freeze`.'; \
	  $(BIN)/pip freeze --exclude-editable; } > constraints.txt

clean:
	rm -rf runs outputs wandb lightning_logs .pytest_cache
