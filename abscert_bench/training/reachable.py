"""AbsCert training against the reachable abstract inputs of the eps-ball (issue 14): `abscert-adv`, `abscert-random`.

The deployed classifier is AbsCert's, N(phi(x)); what changes is which abstract inputs N is trained on. For a
training image x and radius eps, the reachable abstract inputs are the products of per-pixel options
(`sound.choices.reachable_options`: the exact float32 sweep the sound verifier uses; with d >= 2·eps a pixel
has at most two). `abscert-sound` certifies N on all of them, so training on them targets what is certified:

- `abscert-adv`: cross-entropy on the worst reachable input the verifier's own discrete attack finds
  (`sound.attack.search_choices`: gradient-guided rounding to the allowed options, `attack_steps` steps from the
  clean choice and `attack_restarts` random starts; the lowest margin found; per image the larger cross-entropy
  of it and of phi(x), which is reachable too, so the adversarial loss is never below the clean one), mixed with
  the clean abstraction loss as (1 - w)·CE(clean) + w·CE(adversarial), w = `mix` × the schedule's ramp fraction
  (0 while warming up). The attack radius follows the eps ramp too.
- `abscert-random`: the same mixture with a uniformly sampled reachable input instead of the worst one — the
  control that tells worst cases from merely seeing the neighbouring cells.

Granularity: `d` defaults to 2·eps (the finest the paper's rule d >= 2·eps allows; 0.2 when eps is 0). The IBP-
style certified version over the exact hull is `abscert-ibp` (abscert_bench_baselines.hull_training).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..sound.attack import abstract_batch, random_choices, search_choices
from ..sound.choices import reachable_options
from .methods import METHODS, AbsCertMethod, TrainingMethod, reject_unknown_options
from .schedule import Schedule

DEFAULT_D_WITHOUT_EPS = 0.2


def default_granularity(d: float | None, eps: float) -> float:
    """`d` as given, else the finest granularity the paper's rule allows, 2·eps (0.2 when eps is 0)."""
    if d is not None:
        return float(d)
    return min(1.0, 2 * float(eps)) if eps > 0 else DEFAULT_D_WITHOUT_EPS


def check_mix(name: str, mix: Any) -> float:
    """The final weight of the reachable-input loss: a number in [0, 1]."""
    if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not (0 <= mix <= 1 and math.isfinite(mix)):
        raise UserError(f"{name} mix must be in [0, 1] (the final weight of the reachable-input loss), got {mix!r}")
    return float(mix)


class ReachableInputMethod(AbsCertMethod):
    """AbsCert with the loss mixed between phi(x) and one reachable abstract input per image (see module doc)."""

    uses_eps_schedule = True

    def __init__(self, name: str, d: float, eps: float, variant: str = "point", mix: float = 0.5) -> None:
        super().__init__(d, eps, variant)
        self.name = name
        self.mix = check_mix(name, mix)
        self.options = {**self.options, "mix": self.mix}
        self.static_input = False  # the reachable inputs depend on the image and the scheduled eps

    def reachable_choice(self, network, options, samples: np.ndarray, y: torch.Tensor) -> np.ndarray:
        """One option index per pixel of each image (n × P)."""
        raise NotImplementedError

    def reached_loss(self, clean: torch.Tensor, reached: torch.Tensor) -> torch.Tensor:
        """Mean loss on the reached inputs, from per-sample cross-entropies of the clean and the reached inputs."""
        return reached.mean()

    def loss(self, network, x, y, schedule: Schedule, step: int):
        logits = self.logits(network, self.network_input(x))
        clean = F.cross_entropy(logits, y, reduction="none")
        weight = self.mix * schedule.fraction(step)
        eps = schedule.eps_at(step)
        if weight <= 0 or eps <= 0:
            return clean.mean(), logits
        options = reachable_options(self._abstraction, x.detach(), eps)
        samples = np.arange(len(x))
        choice = self.reachable_choice(network, options, samples, y)
        reached_inputs = abstract_batch(options, samples, choice).to(x.device)
        reached = F.cross_entropy(self.logits(network, reached_inputs), y, reduction="none")
        return (1 - weight) * clean.mean() + weight * self.reached_loss(clean, reached), logits


class AdversarialMethod(ReachableInputMethod):
    """`abscert-adv`: the worst reachable input found by the verifier's discrete attack."""

    def __init__(self, d: float, eps: float, variant: str = "point", mix: float = 0.5, attack_steps: int = 1,
                 attack_restarts: int = 0) -> None:
        super().__init__("abscert-adv", d, eps, variant, mix)
        for key, value, least in (("attack_steps", attack_steps, 1), ("attack_restarts", attack_restarts, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"abscert-adv {key} must be an integer >= {least}, got {value!r}")
        self.attack_steps, self.attack_restarts = attack_steps, attack_restarts
        self.options = {**self.options, "attack_steps": attack_steps, "attack_restarts": attack_restarts}

    def reached_loss(self, clean, reached):
        # the worst of the clean input (itself reachable) and the one found, per image: never below the clean loss
        return torch.maximum(clean, reached).mean()

    def reachable_choice(self, network, options, samples, y):
        seed = int(torch.randint(0, 2**31 - 1, (1,)))  # from torch's generator: the loop's seed fixes the run
        _, worst, _ = search_choices(network, options, samples, y, self.attack_steps, self.attack_restarts, seed,
                                     stop_on_hit=False)
        return worst


class RandomReachableMethod(ReachableInputMethod):
    """`abscert-random`: a uniformly sampled reachable input (each pixel's option drawn independently)."""

    def __init__(self, d: float, eps: float, variant: str = "point", mix: float = 0.5) -> None:
        super().__init__("abscert-random", d, eps, variant, mix)

    def reachable_choice(self, network, options, samples, y):
        return random_choices(options, samples, np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,)))))


@METHODS.register("abscert-adv")
def abscert_adv(eps: float = 0.0, d: float | None = None, variant: str = "point", mix: float = 0.5,
                attack_steps: int = 1, attack_restarts: int = 0, **rest: Any) -> TrainingMethod:
    """AbsCert trained on the worst reachable abstract input the discrete attack finds (mixed with the clean loss)."""
    reject_unknown_options("abscert-adv", rest, "d, variant, mix, attack_steps, attack_restarts")
    return AdversarialMethod(default_granularity(d, eps), eps, variant, mix, attack_steps, attack_restarts)


@METHODS.register("abscert-random")
def abscert_random(eps: float = 0.0, d: float | None = None, variant: str = "point", mix: float = 0.5,
                   **rest: Any) -> TrainingMethod:
    """AbsCert trained on a uniformly sampled reachable abstract input (mixed with the clean loss)."""
    reject_unknown_options("abscert-random", rest, "d, variant, mix")
    return RandomReachableMethod(default_granularity(d, eps), eps, variant, mix)


__all__ = ["AdversarialMethod", "RandomReachableMethod", "ReachableInputMethod", "default_granularity"]
