"""abscert-bench: AbsCert vs auto_LiRPA certified-training baselines, one harness — and a Python API.

    import abscert_bench as ab
    trained = ab.train(my_module, loader, "abscert", eps=0.1, d=0.2, epochs=5)
    results = ab.verify(trained, x, y, eps=0.1, verifiers=["abscert-paper", "abscert-sound"])

The names below are imported on first use (PEP 562), so `import abscert_bench` stays cheap and torch-free for
the CLI; see docs/api.md for the whole API.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # the abstraction
    "Abstraction": "abscert_bench.abstraction",
    "reachable_choices": "abscert_bench.api",
    # models and training
    "TrainedModel": "abscert_bench.trained",
    "load_checkpoint": "abscert_bench.trained",
    "save_checkpoint": "abscert_bench.trained",
    "model": "abscert_bench.api",
    "train": "abscert_bench.api",
    "accuracy": "abscert_bench.api",
    "TrainConfig": "abscert_bench.training.config",
    # auto_LiRPA
    "BoundedPair": "abscert_bench.api",
    "bounded_hull": "abscert_bench.api",
    "bounded_ball": "abscert_bench.api",
    "lirpa": "abscert_bench.lirpa_compat",
    # verification and export
    "verify": "abscert_bench.api",
    "results_frame": "abscert_bench.api",
    "SampleResult": "abscert_bench.verification.base",
    "Verifier": "abscert_bench.verification.base",
    "summarize": "abscert_bench.verification.base",
    "export_vnncomp": "abscert_bench.api",
    # registries (complete on import: built-ins, baselines, installed plugins)
    "METHODS": "abscert_bench.training.methods",
    "TrainingMethod": "abscert_bench.training.methods",
    "VERIFIERS": "abscert_bench.verification.base",
    "MODELS": "abscert_bench.models",
    "DATASETS": "abscert_bench.data",
    "registered": "abscert_bench.api",
    "UserError": "abscert_bench.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'abscert_bench' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
