"""Crosscheck set-up (`make crosscheck`, its own .venv-crosscheck with maraboupy and onnx2pytorch).

These tests are not collected by `make test` (pyproject's addopts ignore tests/crosscheck). Where the real
torchvision is not installed, the stub package in stubs/ stands in for it: onnx2pytorch imports torchvision at
import time only for ops our exports never emit. The project's own code never imports maraboupy, onnx2pytorch or
torchvision.
"""
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("torchvision") is None:
    sys.path.insert(0, str(Path(__file__).parent / "stubs"))
