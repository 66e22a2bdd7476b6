"""The verifier protocol, its registry, and the cascade."""
from . import paper, pgd  # noqa: F401  (register)
from .base import VERIFIERS, SampleResult, Verifier, create_verifier, summarize
from .cascade import run_cascade

__all__ = ["VERIFIERS", "SampleResult", "Verifier", "create_verifier", "summarize", "run_cascade"]
