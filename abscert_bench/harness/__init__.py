"""The comparison harness: suite specs → cells → a resumable results store → paper-style tables and plots."""
from .spec import Cell, Spec, load_spec, parse_spec
from .store import Store
from .suite import SuiteReport, run_suite

__all__ = ["Cell", "Spec", "Store", "SuiteReport", "load_spec", "parse_spec", "run_suite"]
