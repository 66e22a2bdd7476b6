# Two commands do all the set-up: `make demo` (main job on the embedded digits) and `make test` (lint,
# type check, tests).
# Each creates/updates .venv: torch 2.13.0 (the CPU wheel from PyTorch's CPU index when that index answers,
# else whatever this machine's pip configuration offers), auto-lirpa 0.3 with --no-deps (its metadata pins
# torch<1.13), then this package with its test extras.
# GPU users: `make TORCH_INDEX=https://download.pytorch.org/whl/cu126 test` (any CUDA index of PyTorch), or
# TORCH_INDEX= (empty) for PyPI's default build, which is the CUDA one on Linux.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.abscert-installed
TORCH_VERSION := 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test lint bench data clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ -n "$(TORCH_INDEX)" ] && $(BIN)/python -c "import sys, urllib.request; \
	urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=10)" "$(TORCH_INDEX)" 2>/dev/null; then \
	  echo "torch $(TORCH_VERSION) from $(TORCH_INDEX)"; \
	  $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" --index-url "$(TORCH_INDEX)"; \
	else \
	  echo "torch $(TORCH_VERSION) from the configured pip indexes (TORCH_INDEX '$(TORCH_INDEX)' empty or unreachable)"; \
	  $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"; \
	fi
	$(BIN)/python -m pip install -q --no-deps auto-lirpa==0.3
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/abscert-bench demo --force

test: $(STAMP)
	$(BIN)/ruff check abscert_bench baselines tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check abscert_bench baselines tests benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/abscert-bench bench

data: $(STAMP)
	$(BIN)/abscert-bench data prepare

clean-venv:
	rm -rf $(VENV)
