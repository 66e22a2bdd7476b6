"""IBP and CROWN-IBP certified training (Gowal et al. 2018; Zhang et al. 2020) through auto_LiRPA."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from abscert_bench.abstraction import ball
from abscert_bench.errors import UserError
from abscert_bench.training.methods import METHODS, TrainingMethod
from abscert_bench.training.schedule import Schedule

from .bounds import bounded_module, margin_lower_bounds, worst_case_logits


class BoundTrainingMethod(TrainingMethod):
    """loss = kappa·CE(clean) + (1-kappa)·CE(worst case), worst case from margin lower bounds."""

    uses_eps_schedule = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.options = {}
        self.bounded = None

    def prepare(self, network: nn.Module, example: torch.Tensor) -> None:
        self.bounded = bounded_module(network, example)

    def margin_bounds(self, lower, upper, y, num_classes, schedule: Schedule, step: int) -> torch.Tensor:
        """IBP margin lower bounds (CROWN-IBP overrides)."""
        return margin_lower_bounds(self.bounded, lower, upper, y, num_classes, "ibp")

    def loss(self, network, x, y, schedule: Schedule, step: int):
        if self.bounded is None:
            raise RuntimeError("prepare() must be called before loss()")
        logits = self.bounded(x)
        clean = F.cross_entropy(logits, y)
        eps = schedule.eps_at(step)
        if eps <= 0:
            return clean, logits
        num_classes = logits.shape[1]
        lower, upper = ball(x, eps)
        margins = self.margin_bounds(lower, upper, y, num_classes, schedule, step)
        robust = F.cross_entropy(worst_case_logits(margins, y, num_classes), y)
        kappa = schedule.kappa_at(step)
        return kappa * clean + (1 - kappa) * robust, logits


class CrownIBPMethod(BoundTrainingMethod):
    """CROWN-IBP: beta·CROWN-IBP bound + (1-beta)·IBP bound, beta ramped from 1 to 0."""

    def margin_bounds(self, lower, upper, y, num_classes, schedule: Schedule, step: int) -> torch.Tensor:
        beta = schedule.beta_at(step)
        ibp = margin_lower_bounds(self.bounded, lower, upper, y, num_classes, "ibp")
        if beta < 1e-6:
            return ibp
        crown_ibp = margin_lower_bounds(self.bounded, lower, upper, y, num_classes, "crown-ibp")
        return beta * crown_ibp + (1 - beta) * ibp


def _no_options(name: str, options: dict[str, Any]) -> None:
    if options:
        raise UserError(f"method {name} takes no options, got {', '.join(options)}")


@METHODS.register("ibp")
def ibp(eps: float = 0.0, **options: Any) -> TrainingMethod:
    """IBP certified training."""
    _no_options("ibp", options)
    return BoundTrainingMethod("ibp")


@METHODS.register("crown-ibp")
def crown_ibp(eps: float = 0.0, **options: Any) -> TrainingMethod:
    """CROWN-IBP certified training."""
    _no_options("crown-ibp", options)
    return CrownIBPMethod("crown-ibp")
