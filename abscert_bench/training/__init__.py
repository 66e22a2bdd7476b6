"""One training loop, pluggable training methods."""
# Complete on import: the auto_LiRPA-backed IBP / CROWN-IBP methods and the installed plugins register here.
import abscert_bench_baselines.training  # noqa: E402,F401

from ..plugins import load_plugins  # noqa: E402
from . import config  # noqa: E402,F401  (the attribute, also when the CLI loaded config.py before this package)
from . import reachable  # noqa: E402,F401  (abscert-adv, abscert-random)
import abscert_bench_baselines.hull_training  # noqa: E402,F401,I001  (abscert-ibp, abscert-crown-ibp)
from .methods import METHODS, TrainingMethod, create_method
from .schedule import Schedule

load_plugins()

__all__ = ["METHODS", "TrainingMethod", "create_method", "Schedule"]
