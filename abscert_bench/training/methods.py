"""Training methods: given a network, a batch, and the schedule state → loss. One loop serves all."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..abstraction import VARIANTS, Abstraction, check_granularity
from ..errors import UserError
from ..registry import Registry
from .schedule import Schedule


class TrainingMethod:
    """Base class: natural training. Subclasses change the input abstraction or the loss."""

    name = "natural"
    options: dict[str, Any] = {}
    uses_eps_schedule = False  # True for methods whose loss follows the warm-up/ramp eps schedule
    static_input = False  # True when network_input(x) depends on x alone: the loop maps the data set once

    def model_options(self) -> dict[str, Any]:
        """Extra model-config entries this method needs in the network (e.g. a fixed input normalisation)."""
        return {}

    def abstraction(self) -> Abstraction | None:
        """The abstraction in front of the network (None: the network sees raw images)."""
        return None

    def prepare(self, network: nn.Module, example: torch.Tensor) -> None:
        """Hook called once before training with an example batch of network inputs."""

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the network sees for raw images x."""
        abstraction = self.abstraction()
        return x if abstraction is None else abstraction(x)

    def loss(
        self, network: nn.Module, x: torch.Tensor, y: torch.Tensor, schedule: Schedule, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (loss, clean logits) for raw images x with labels y."""
        return self.loss_from_input(network, self.network_input(x), y)

    def loss_from_input(
        self, network: nn.Module, inputs: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy on already-mapped network inputs (used directly when `static_input`)."""
        logits = network(inputs)
        return F.cross_entropy(logits, y), logits

    def describe(self) -> dict[str, Any]:
        """Method name and options, for the run config."""
        return {"name": self.name, **self.options}


METHODS: Registry[Callable[..., TrainingMethod]] = Registry("training method")


@METHODS.register("natural")
def natural(eps: float = 0.0, **options: Any) -> TrainingMethod:
    """Plain cross-entropy on raw images."""
    if options:
        raise UserError(f"method natural takes no options, got {', '.join(options)}")
    return TrainingMethod()


class AbsCertMethod(TrainingMethod):
    """AbsCert: cross-entropy on abstract inputs phi(x) (point) or on the merged cells of the eps-interval (region)."""

    name = "abscert"

    def __init__(self, d: float, eps: float, variant: str = "point") -> None:
        if variant not in VARIANTS:
            raise UserError(f"unknown abscert variant {variant!r}; valid: {', '.join(VARIANTS)}")
        self._abstraction = Abstraction(variant, check_granularity(d), eps)
        self.options = {"d": float(d), "variant": variant}
        self.static_input = variant == "point"  # phi(x) needs no eps: computed once per data set

    def abstraction(self) -> Abstraction:
        return self._abstraction


@METHODS.register("abscert")
def abscert(d: float = 0.2, variant: str = "point", eps: float = 0.0, **rest: Any) -> TrainingMethod:
    """AbsCert training with granularity d ('point' as in the official code, or 'region')."""
    if rest:
        raise UserError(f"unknown abscert options: {', '.join(rest)}; valid: d, variant")
    return AbsCertMethod(d, eps, variant)


def accepted_options(name: str, candidates: dict[str, Any]) -> dict[str, Any]:
    """The subset of `candidates` that method `name`'s builder takes (so callers never branch on names)."""
    import inspect

    import baselines  # noqa: F401

    parameters = inspect.signature(METHODS.get(name)).parameters
    return {k: v for k, v in candidates.items() if k in parameters and k != "eps"}


def create_method(name: str, eps: float, **options: Any) -> TrainingMethod:
    """Build a training method by registry name; `eps` is passed to methods that need it."""
    import baselines  # noqa: F401  registers the auto_LiRPA-backed methods

    return METHODS.get(name)(eps=eps, **options)
