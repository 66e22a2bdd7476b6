"""One training loop, pluggable training methods."""
from .methods import METHODS, TrainingMethod, create_method
from .schedule import Schedule

__all__ = ["METHODS", "TrainingMethod", "create_method", "Schedule"]
