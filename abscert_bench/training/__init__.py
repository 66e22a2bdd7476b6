"""One training loop, pluggable training methods."""
# Complete on import: the auto_LiRPA-backed IBP / CROWN-IBP methods and the installed plugins register here.
# Issue 14's abstraction-training methods: abscert-adv / abscert-random (reachable.py), abscert-ibp / -crown-ibp.
import abscert_bench_baselines.hull_training  # noqa: F401
import abscert_bench_baselines.training  # noqa: F401

from ..plugins import load_plugins  # noqa: E402
from . import config, reachable  # noqa: F401  (config: the attribute, also when the CLI loaded config.py first)
from .methods import METHODS, TrainingMethod, create_method
from .schedule import Schedule

load_plugins()

__all__ = ["METHODS", "TrainingMethod", "create_method", "Schedule"]
