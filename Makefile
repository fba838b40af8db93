# Two commands do everything: `make run` and `make test` (both create .venv and install first).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

include slimdiff.env
export $(shell sed -n 's/^\([A-Z_][A-Z0-9_]*\)=.*/\1/p' slimdiff.env)

.PHONY: run repro test test-fast lint format install train-toy train-toy-mmdit train-toy-flux bench clean

install: $(STAMP)

# constraints.txt is the tested set, frozen (torch 2.14.1 + torchvision 0.29.1 + open_clip 3.3 ...),
# installed exactly as pinned (--no-deps: no resolver, nothing newer slips in); pyproject.toml keeps
# the ranges a downstream user may resolve. Left out: triton, torch's GPU kernel compiler (0.9 GB;
# nothing here uses it: torch.compile on the CPU generates C++). The venv needs ~$(VENV_GB) GB of disk:
# torch + torchvision exist here only as CUDA builds (see docs/operations.md), so say so up front
# rather than fail half-way with "No space left on device".
VENV_GB := 6.2
$(STAMP): pyproject.toml constraints.txt tools/check_lock.py
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	@test -x $(BIN)/python || { \
	  free_kb=$$(df -Pk . | awk 'NR==2 {print $$4}'); \
	  if [ "$${SLIMDIFF_SKIP_DISK_CHECK:-0}" != 1 ] && [ "$$free_kb" -lt $$(awk 'BEGIN {print int($(VENV_GB) * 1048576)}') ]; then \
	    echo "error: installing needs ~$(VENV_GB) GB free for $(VENV)/ (torch's CUDA build), and $$(pwd) has $$((free_kb / 1048576)) GB free."; \
	    echo "       Free some disk, or set SLIMDIFF_SKIP_DISK_CHECK=1 to try anyway."; exit 1; \
	  fi; $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -qq --no-deps -r <(grep -v '^triton==' constraints.txt)
	$(BIN)/python -m pip install -qq --no-deps -e .
	$(BIN)/python tools/check_lock.py triton
	@touch $(STAMP)

# The whole pipeline on the embedded default (the committed toy model) with embedded services:
# Prefect's local server, MLflow on ./mlflow.db, DVC's local cache.
run: $(STAMP)
	$(BIN)/slimdiff run --params params.yaml

# The same stages with DVC (dvc.yaml calls .venv/bin/python, so nothing needs activating).
repro: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Retrain the toy world from scratch (deterministic; about 45 minutes on 2 CPU cores).
train-toy: $(STAMP)
	$(BIN)/python -m slimdiff.toy.train --out data/toy

# Retrain the toy MMDiT world (SD3-architecture) on the same data, VAE and judges (needs data/toy).
train-toy-mmdit: $(STAMP)
	$(BIN)/python -m slimdiff.toy.train_mmdit --out data/toy-mmdit

# Retrain the toy FLUX world (FLUX.1-architecture) on the same data, VAE and judges (needs data/toy).
train-toy-flux: $(STAMP)
	$(BIN)/python -m slimdiff.toy.train_flux --out data/toy-flux

# Benchmarks print ratios against a baseline measured in the same run (tens of minutes on 2 cores).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_slimset.py
	$(BIN)/python benchmarks/bench_calibration.py
	$(BIN)/python benchmarks/bench_speed.py --write
	$(BIN)/python benchmarks/bench_pipeline.py --write
	$(BIN)/python benchmarks/ablation.py --write

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
