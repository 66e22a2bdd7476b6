# Two commands do all the set-up: `make demo` (main job on the embedded digits) and `make test` (lint, type check, tests).
# Each creates/updates .venv: torch pinned to the CPU wheel so pip never pulls a CUDA build,
# auto-lirpa 0.3 with --no-deps (its metadata pins torch<1.13), then this package with its test extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.abscert-installed

.PHONY: demo test lint bench data clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
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
