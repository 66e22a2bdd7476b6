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

.PHONY: demo test lint bench data clean-venv crosscheck

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

# External crosscheck (tests/crosscheck, not part of `make test`): Marabou (maraboupy 2.0.0) and onnx2pytorch 0.6.0
# load a small exported digits folder; verdicts and outputs are compared with ours (table: build/crosscheck.md).
# They live in their own venv, .venv-crosscheck, made from .venv's interpreter; a .pth file adds .venv's
# site-packages (torch, onnx, onnxruntime, this package) behind its own, so nothing is installed twice and .venv
# is untouched. Both are installed with --no-deps: maraboupy has no run-time requirements, onnx2pytorch's would
# pull torchvision and another torch (tests/crosscheck/stubs has a test-only torchvision stand-in for its imports).
XVENV ?= .venv-crosscheck
XBIN := $(XVENV)/bin
XSTAMP := $(XVENV)/.crosscheck-installed

$(XSTAMP): $(STAMP) Makefile
	test -x $(XBIN)/python || $(BIN)/python -m venv $(XVENV)
	$(BIN)/python -c "import site, sysconfig; print('import site; site.addsitedir(%r)' % \
	sysconfig.get_paths()['purelib'])" > "$$($(XBIN)/python -c "import sysconfig; \
	print(sysconfig.get_paths()['purelib'])")/abscert-main-venv.pth"
	$(XBIN)/python -m pip install -q --no-deps maraboupy==2.0.0 onnx2pytorch==0.6.0
	touch $(XSTAMP)

crosscheck: $(XSTAMP)
	CROSSCHECK_REPORT=build/crosscheck.md $(XBIN)/python -m pytest -o addopts=-ra tests/crosscheck
	@cat build/crosscheck.md

clean-venv:
	rm -rf $(VENV) $(XVENV)
