"""Certified training over the exact hull of AbsCert's reachable abstract inputs: `abscert-ibp`, `abscert-crown-ibp`.

The deployed classifier is AbsCert's, N(phi(x)). `abscert-sound` certifies it by bounding N over the hull of the
abstract inputs the clipped eps-ball can reach, in the *gap form* (`abscert_bench.sound.bounds`): N's input is
[lower ends L, gaps G = U - L], and the hull is a box in (L, G). This method trains N on auto_LiRPA's bound of that
same box — so its robust loss bounds exactly the quantity the sound verifier certifies (up to the float32 care the
verifier adds: training needs no ulp widening).

The box: both ends of the abstract pair A(v) are non-decreasing in the pixel value v (point and region variants),
so over the ball [lo, hi] the lower ends span [A(lo).L, A(hi).L]; for the point variant a pixel's gap is d in every
cell but a clipped last one, so the gaps span min / max of G(lo), G(hi) (a constant d when d divides 1). The region
variant's ends move independently: its box is [A(lo), A(hi)] in (L, U). With d >= 2·eps only the pixels within eps
of a cell edge have a box of non-zero width (about 70 of 784 on MNIST at eps 0.1), where IBP on the raw image
bounds all 784 over a width of 2·eps.

Everything else is the baselines' recipe machinery (`BoundTrainingMethod`): IBP initialisation, warm-up
regularisers, eps ramp (the hull grows with the scheduled eps), robust / kappa loss mix, loss fusion, and for
`abscert-crown-ibp` the CROWN-IBP mix of Zhang et al. The deployed model is stored like AbsCert's (its
abstraction, 2C input channels), so the harness verifies it with `abscert-paper` and `abscert-sound`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from abscert_bench.abstraction import Abstraction
from abscert_bench.sound.bounds import GapHullNetwork
from abscert_bench.training.methods import METHODS, TrainingMethod, reject_unknown_options
from abscert_bench.training.reachable import default_granularity

from .training import BoundTrainingMethod, CrownIBPMethod


class HullBoundMixin:
    """The hooks that turn the baselines' IBP / CROWN-IBP training into training over the abstraction's hull."""

    _abstraction: Abstraction
    options: dict[str, Any]

    def setup_abstraction(self, d: float, eps: float, variant: str) -> None:
        self._abstraction = Abstraction(variant, float(d), eps)  # checks the variant and d (a UserError)
        self.options = {"d": float(d), "variant": variant, **self.options}
        self._box_form = "gap" if variant == "point" else "ends"  # the coordinates abscert-sound bounds in

    def abstraction(self) -> Abstraction:
        return self._abstraction

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        return self._abstraction(x)

    def bound_network(self, network: nn.Module) -> tuple[nn.Module, str]:
        channels = self._example_channels
        return GapHullNetwork(network, channels, gap=self._abstraction.variant == "point"), "network."

    def bound_input(self, x: torch.Tensor) -> torch.Tensor:
        return self._abstraction.reachable_box(x, 0.0, self._box_form)[0]  # phi(x) in those coordinates

    def input_box(self, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self._abstraction.reachable_box(x, eps, self._box_form)

    def prepare(self, network: nn.Module, example: torch.Tensor) -> None:
        self._example_channels = example.shape[1] // 2  # example: N's input, 2C channels
        super().prepare(network, example)  # type: ignore[misc]


class HullIBPMethod(HullBoundMixin, BoundTrainingMethod):
    """`abscert-ibp`: IBP certified training over the AbsCert hull (module docstring)."""


class HullCrownIBPMethod(HullBoundMixin, CrownIBPMethod):
    """`abscert-crown-ibp`: CROWN-IBP certified training over the AbsCert hull (module docstring)."""


HULL_OPTIONS = "d, variant, init, reg_weight, reg_tol, loss_mix, loss_fusion"


@METHODS.register("abscert-ibp")
def abscert_ibp(eps: float = 0.0, d: float | None = None, variant: str = "point", init: str = "ibp",
                reg_weight: float = 0.5, reg_tol: float = 0.5, loss_mix: str = "robust", loss_fusion: bool = False,
                **rest: Any) -> TrainingMethod:
    """IBP training over the exact hull of AbsCert's reachable abstract inputs (d defaults to 2·eps)."""
    reject_unknown_options("abscert-ibp", rest, HULL_OPTIONS)
    method = HullIBPMethod("abscert-ibp", init, reg_weight, reg_tol, loss_mix, loss_fusion)
    method.setup_abstraction(default_granularity(d, eps), eps, variant)
    return method


@METHODS.register("abscert-crown-ibp")
def abscert_crown_ibp(eps: float = 0.0, d: float | None = None, variant: str = "point", init: str = "ibp",
                      reg_weight: float = 0.5, reg_tol: float = 0.5, loss_mix: str = "robust",
                      loss_fusion: bool = True, **rest: Any) -> TrainingMethod:
    """CROWN-IBP training over the exact hull of AbsCert's reachable abstract inputs (d defaults to 2·eps)."""
    reject_unknown_options("abscert-crown-ibp", rest, HULL_OPTIONS)
    method = HullCrownIBPMethod("abscert-crown-ibp", init, reg_weight, reg_tol, loss_mix, loss_fusion)
    method.setup_abstraction(default_granularity(d, eps), eps, variant)
    return method
