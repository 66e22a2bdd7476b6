"""Training methods: given a network, a batch, and the schedule state → loss. One loop serves all."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..abstraction import VARIANTS, Abstraction, check_granularity
from ..errors import UserError
from ..official import (
    DEFAULT_D_STEP,
    NORMALIZE_MEAN,
    NORMALIZE_STD,
    RECIPES_CHOICES,
    check_protocol,
    official_candidates,
)
from ..registry import Registry
from .lower_form import divides_one, lower_forward
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
    """AbsCert: cross-entropy on abstract inputs phi(x) (point) or on the merged cells of the eps-interval (region).

    `protocol` (see `abscert_bench.official`): 'pixel' — eps and d in raw-pixel units, as given; 'official' /
    'clean' — the published code's units and cells (d = 1/K for K = 2 // paper d), N with the fixed [-1, 1]
    normalisation inside, the official weight decay, xavier init and (CIFAR) augmentation, set by `configure`.
    """

    name = "abscert"

    def __init__(self, d: float, eps: float, variant: str = "point", protocol: str = "pixel",
                 recipe: str | None = None, d_step: float | None = None) -> None:
        if variant not in VARIANTS:
            raise UserError(f"unknown abscert variant {variant!r}; valid: {', '.join(VARIANTS)}")
        self._abstraction = Abstraction(variant, check_granularity(d), eps)
        self.protocol = protocol
        self.options = {"d": float(d), "variant": variant}
        if protocol != "pixel":
            self.options.update({"protocol": protocol, "recipe": recipe or "official",
                                 "d_step": DEFAULT_D_STEP if d_step is None else float(d_step)})
        self.static_input = variant == "point"  # phi(x) needs no eps: computed once per data set
        self.channels: int | None = None  # image channels C (the normalisation covers 2C), set by `configure`
        self.weight_decay = 0.0
        self.augment = False

    def configure(self, recipe: dict[str, Any], channels: int) -> AbsCertMethod:
        """Apply an official recipe row's method-side parts (weight decay, augmentation) for C-channel images."""
        self.channels = int(channels)
        self.weight_decay = float(recipe.get("weight_decay", 0.0))
        self.augment = bool(recipe.get("augment", False))
        self.static_input = self._abstraction.variant == "point" and not self.augment
        return self

    def model_options(self) -> dict[str, Any]:
        if self.protocol == "pixel":
            return {}
        if self.channels is None:
            raise UserError("abscert protocol official/clean: configure(recipe, channels) before building N")
        width = 2 * self.channels
        return {"normalize": [[NORMALIZE_MEAN] * width, [NORMALIZE_STD] * width]}

    def abstraction(self) -> Abstraction:
        return self._abstraction

    def loss(self, network, x, y, schedule, step):
        if self.augment:
            x = augment_official(x)
        return self.loss_from_input(network, self.network_input(x), y)

    def logits(self, network: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """N(inputs) for abstract inputs of the point or region form."""
        if self._abstraction.variant == "point" and divides_one(self._abstraction.d) and inputs.dim() == 4:
            # every cell has width d: the first layer reads the lower ends only (same function, ~half its cost)
            logits = lower_forward(network, inputs[:, :inputs.shape[1] // 2], self._abstraction.d)
            if logits is not None:
                return logits
        return network(inputs)

    def loss_from_input(self, network, inputs, y):
        logits = self.logits(network, inputs)
        loss = F.cross_entropy(logits, y)
        if self.weight_decay > 0:  # Adam's coupled weight decay wd·θ on the gradient == (wd/2)·||θ||² in the loss
            loss = loss + 0.5 * self.weight_decay * sum(p.pow(2).sum() for p in network.parameters())
        return loss, logits


def augment_official(x: torch.Tensor) -> torch.Tensor:
    """The official CIFAR training augmentation on raw [0,1] images (fills are 0 on [-1, 1] = pixel 0.5):
    horizontal flip (p 0.5), random erasing (p 0.5, area 4–20 %, aspect 0.5–2), random crop with padding 4."""
    n, _, h, w = x.shape
    out = x.clone()
    flip = torch.rand(n) < 0.5
    out[flip] = out[flip].flip(-1)
    for i in torch.nonzero(torch.rand(n) < 0.5).flatten().tolist():
        for _ in range(10):
            area = h * w * float(torch.empty(1).uniform_(0.04, 0.2))
            ratio = math.exp(float(torch.empty(1).uniform_(math.log(0.5), math.log(2.0))))
            eh, ew = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if eh < h and ew < w:
                top, left = int(torch.randint(0, h - eh + 1, (1,))), int(torch.randint(0, w - ew + 1, (1,)))
                out[i, :, top:top + eh, left:left + ew] = 0.5
                break
    pad = 4
    padded = F.pad(out, (pad, pad, pad, pad), value=0.5)
    shifts = torch.randint(0, 2 * pad + 1, (n, 2))
    for i in range(n):
        top, left = int(shifts[i, 0]), int(shifts[i, 1])
        out[i] = padded[i, :, top:top + h, left:left + w]
    return out


@METHODS.register("abscert")
def abscert(d: float | None = None, variant: str = "point", eps: float = 0.0, protocol: str = "pixel",
            recipe: str | None = None, d_step: float | None = None, **rest: Any) -> TrainingMethod:
    """AbsCert training with granularity d ('point' as in the official code, or 'region').

    protocol 'pixel' (default): d (default 0.2) and eps in raw-pixel units. 'official' / 'clean': the
    granularity candidates come from the official rule at paper eps = 2·eps (d need not be given; when it is,
    it must be one of their pixel granularities 1/K), `recipe` 'official' (default) or 'given', `d_step`.
    """
    if rest:
        raise UserError(f"unknown abscert options: {', '.join(rest)}; valid: d, variant, protocol, recipe, d_step")
    check_protocol(protocol)
    if protocol == "pixel":
        if recipe is not None or d_step is not None:
            raise UserError("abscert options recipe and d_step belong to protocol official or clean")
        return AbsCertMethod(0.2 if d is None else d, eps, variant)
    if variant != "point":
        raise UserError(f"abscert protocol {protocol} uses the point abstraction of the official code, "
                        f"not {variant!r}")
    if recipe is not None and recipe not in RECIPES_CHOICES:
        raise UserError(f"unknown abscert recipe {recipe!r}; valid: {', '.join(RECIPES_CHOICES)}")
    step = DEFAULT_D_STEP if d_step is None else float(d_step)
    candidates = official_candidates(eps, step)
    if d is None:
        d = candidates[-1].pixel_d  # a stand-in until the search picks one (the finest candidate)
    elif not any(abs(c.pixel_d - float(d)) <= 1e-12 for c in candidates):
        raise UserError(f"abscert protocol {protocol} chooses d itself among the official candidates "
                        f"(pixel d = 1/K, K in {[c.cells for c in candidates]}); drop d, or use protocol pixel")
    return AbsCertMethod(float(d), eps, variant, protocol, recipe, step)


def reject_unknown_options(name: str, rest: dict[str, Any], valid: str) -> None:
    """The UserError a method builder raises for options it does not take (`valid`: the ones it does)."""
    if rest:
        raise UserError(f"unknown {name} options: {', '.join(rest)}; valid: {valid}")


def accepted_options(name: str, candidates: dict[str, Any]) -> dict[str, Any]:
    """The subset of `candidates` that method `name`'s builder takes (so callers never branch on names)."""
    import inspect

    parameters = inspect.signature(METHODS.get(name)).parameters
    return {k: v for k, v in candidates.items() if k in parameters and k != "eps"}


def create_method(name: str, eps: float, **options: Any) -> TrainingMethod:
    """Build a training method by registry name; `eps` is passed to methods that need it."""
    return METHODS.get(name)(eps=eps, **options)
