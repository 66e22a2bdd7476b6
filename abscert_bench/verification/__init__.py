"""The verifier protocol, its registry, and the cascade."""
# The registry is complete once this package is imported: the auto_LiRPA baselines (which import auto_LiRPA only
# when they bound) and the installed plugins register here, not on first use.
import abscert_bench_baselines.verifiers  # noqa: E402,F401

from ..plugins import load_plugins  # noqa: E402
from . import paper, pgd, sound  # noqa: F401  (register the core verifiers)
from .base import VERIFIERS, SampleResult, Verifier, create_verifier, summarize
from .cascade import run_cascade

load_plugins()

__all__ = ["VERIFIERS", "SampleResult", "Verifier", "create_verifier", "summarize", "run_cascade"]
