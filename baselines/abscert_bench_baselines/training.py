"""IBP and CROWN-IBP certified training (Gowal et al. 2018; Zhang et al. 2020) through auto_LiRPA.

Defaults follow Shi et al. 2021, "Fast certified robust training with short warmup" (NeurIPS), as released in
github.com/shizhouxing/Fast-Certified-Robust-Training:

- `init="ibp"`: IBP initialisation (their `manual_init.ibp_init`): every Conv2d / Linear weight but the classifier's
  ~ N(0, sigma^2), sigma = sqrt(2*pi) / fan_in (their `std = sqrt(2*pi / fan_in**2)`). Biases are set to 0 here
  (the paper's derivation assumes zero biases; their code leaves PyTorch's default). BatchNorm is untouched.
- `reg_weight=0.5`, `reg_tol=0.5`: the warm-up regularisers L_tightness + L_relu (their `compute_reg` with the
  default `reg_obj = relu, tightness`) on the pre-activation bounds of the IBP pass, weighted
  reg_weight · (1 - eps_t / eps), so they fade linearly to 0 as the training eps reaches its target. While
  eps_t = 0 the bounds are taken at eps 1e-6 (their `min_eps_reg`).
- `loss_mix="robust"`: clean CE while eps_t = 0, then the robust CE alone (their loss). `"kappa"` is the older
  kappa·CE(clean) + (1-kappa)·CE(robust) with kappa 1 → kappa_end over the ramp (Gowal et al., Zhang et al.).
- `loss_fusion`: bound the cross-entropy itself (auto_LiRPA's CrossEntropyWrapper, bound_opts
  {'loss_fusion': True}; Xu et al. 2020) instead of the K-1 margins. Default on for CROWN-IBP (as in
  auto_LiRPA's examples/vision/cifar_training.py and Shi et al.'s crown-ibp method), off for IBP, where it gives
  the same loss (see `FusedLoss`).

BatchNorm networks train with auto_LiRPA's semantics (batch statistics of the clean forward pass, also used for
the bounds); the running statistics are the network's own, so the checkpoint carries them.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from abscert_bench.abstraction import ball
from abscert_bench.errors import UserError
from abscert_bench.lirpa import build_bounded, margin_lower_bounds, relu_input_nodes, set_batchnorm_training
from abscert_bench.training.methods import METHODS, TrainingMethod, reject_unknown_options
from abscert_bench.training.schedule import Schedule

from .bounds import FusedLoss, worst_case_logits

INITS = ("ibp", "default")
LOSS_MIXES = ("robust", "kappa")
REG_MIN_EPS = 1e-6  # eps of the bounds the regularisers use while the training eps is still 0 (their min_eps_reg)


def ibp_init(network: nn.Module) -> None:
    """Shi et al.'s IBP initialisation: weights of every Conv2d / Linear except the last ~ N(0, (sqrt(2π)/fan_in)²),
    their biases 0; the classifier and BatchNorm layers keep their initialisation."""
    layers = [m for m in network.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for layer in layers[:-1]:
            fan_in = layer.weight[0].numel()  # in_features, or in_channels/groups · kernel area
            layer.weight.normal_(0.0, math.sqrt(2 * math.pi) / fan_in)
            if layer.bias is not None:
                layer.bias.zero_()


def regularizer_terms(bounded, lower: torch.Tensor, upper: torch.Tensor, tol: float) -> dict[str, torch.Tensor]:
    """L_tightness and L_relu of Shi et al. 2021 from the pre-activation bounds left by the last bound pass.

    Per ReLU layer i with pre-activation bounds [l, u], centre c = (u+l)/2, radius r = (u-l)/2:
    tightness: relu(tol - mean(r_0)/mean(r_i)) / tol, r_0 the input box radius (bounds no looser than 1/tol × it);
    relu: (relu(tol - rho_mean) + relu(tol - rho_var)) / tol, rho = min(q, 1/q) of the ratios between active
    (l > 0) and inactive (u < 0) neurons of mean(c·mask) (mean_act / -mean_inact) and of sum((c - mean c)²·mask)
    (a layer where a ratio is undefined contributes 0 to this term). Both are averaged over the ReLU layers.
    """
    zero = torch.zeros((), device=lower.device)
    nodes = relu_input_nodes(bounded)
    if not nodes:
        return {"tightness": zero, "relu": zero}
    radius_0 = ((upper - lower) / 2).mean()
    tightness, relu = zero, zero
    for node in nodes:
        lo, hi = node.lower, node.upper
        center, radius = (hi + lo) / 2, (hi - lo) / 2
        tightness = tightness + F.relu(tol - radius_0 / radius.mean().clamp(min=1e-12)) / tol
        active, inactive = lo > 0, hi < 0
        mean_ratio = (center * active).mean() / -(center * inactive).mean()
        delta = (center - center.mean()) ** 2
        var_ratio = (delta * active).sum() / (delta * inactive).sum()
        mean_ratio = torch.min(mean_ratio, 1 / mean_ratio.clamp(min=1e-12))
        var_ratio = torch.min(var_ratio, 1 / var_ratio.clamp(min=1e-12))
        term = (F.relu(tol - mean_ratio) + F.relu(tol - var_ratio)) / tol
        if bool(torch.isfinite(term)):
            relu = relu + term
    return {"tightness": tightness / len(nodes), "relu": relu / len(nodes)}


class BoundTrainingMethod(TrainingMethod):
    """IBP training; see the module docstring for the options."""

    uses_eps_schedule = True
    bound = "ibp"

    def __init__(self, name: str, init: str = "ibp", reg_weight: float = 0.5, reg_tol: float = 0.5,
                 loss_mix: str = "robust", loss_fusion: bool = False) -> None:
        if init not in INITS:
            raise UserError(f"unknown {name} init {init!r}; valid: {', '.join(INITS)}")
        if loss_mix not in LOSS_MIXES:
            raise UserError(f"unknown {name} loss_mix {loss_mix!r}; valid: {', '.join(LOSS_MIXES)}")
        if not (isinstance(reg_weight, (int, float)) and reg_weight >= 0 and math.isfinite(reg_weight)):
            raise UserError(f"{name} reg_weight must be >= 0 (0 = no regularisers), got {reg_weight}")
        if not (isinstance(reg_tol, (int, float)) and 0 < reg_tol <= 1):
            raise UserError(f"{name} reg_tol must be in (0, 1], got {reg_tol}")
        if not isinstance(loss_fusion, bool):
            raise UserError(f"{name} loss_fusion must be true or false, got {loss_fusion!r}")
        self.name = name
        self.init, self.reg_weight, self.reg_tol = init, float(reg_weight), float(reg_tol)
        self.loss_mix, self.loss_fusion = loss_mix, loss_fusion
        self.options = {"init": init, "reg_weight": self.reg_weight, "reg_tol": self.reg_tol,
                        "loss_mix": loss_mix, "loss_fusion": loss_fusion}
        self.bounded = None
        self.fused: FusedLoss | None = None
        self.last_terms: dict[str, float] = {}

    def bound_network(self, network: nn.Module) -> tuple[nn.Module, str]:
        """The module whose outputs are bounded (sharing `network`'s parameters) and the name prefix of `network`'s
        parameters inside it. Plain IBP / CROWN-IBP: the network itself."""
        return network, ""

    def bound_input(self, x: torch.Tensor) -> torch.Tensor:
        """The bounded module's clean input for raw images x."""
        return x

    def input_box(self, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The bounded module's input box for raw images x at radius eps: the clipped L∞ ball."""
        return ball(x, eps)

    def prepare(self, network: nn.Module, example: torch.Tensor) -> None:
        if self.init == "ibp":
            ibp_init(network)
        module, prefix = self.bound_network(network)
        if self.loss_fusion:
            self.fused = FusedLoss(module, example, network=network, prefix=prefix)
            self.bounded = self.fused.bounded
        else:
            self.bounded = build_bounded(module, network, torch.zeros_like(example[:1]), None, example.device, prefix)

    def margin_bounds(self, lower, upper, y, num_classes, schedule: Schedule, step: int) -> torch.Tensor:
        """IBP margin lower bounds (CROWN-IBP overrides)."""
        return margin_lower_bounds(self.bounded, lower, upper, y, num_classes, "ibp")

    def beta(self, schedule: Schedule, step: int) -> float:
        """Weight of the CROWN-IBP bound against IBP (IBP: none)."""
        return 0.0

    def robust_and_regularizer(self, lower, upper, y, num_classes, schedule, step, want_robust, want_reg):
        """(robust CE or None, regulariser terms or None); the regularisers read the IBP pass's bounds."""
        terms: dict = {}

        def read_regularizers() -> None:
            if want_reg:
                terms.update(regularizer_terms(self.bounded, lower, upper, self.reg_tol))

        if self.fused is not None:
            method = self.bound if want_robust else "ibp"
            robust = self.fused.robust_ce(lower, upper, y, method, self.beta(schedule, step), read_regularizers)
            return (robust.mean() if want_robust else None), (terms or None)
        ibp = margin_lower_bounds(self.bounded, lower, upper, y, num_classes, "ibp")
        read_regularizers()
        if not want_robust:
            return None, terms or None
        margins = self.combine_margins(ibp, lower, upper, y, num_classes, schedule, step)
        return F.cross_entropy(worst_case_logits(margins, y, num_classes), y), terms or None

    def combine_margins(self, ibp, lower, upper, y, num_classes, schedule, step) -> torch.Tensor:
        """The margin bounds the robust loss uses, given the IBP ones (CROWN-IBP mixes in its own)."""
        return ibp

    def loss(self, network, x, y, schedule: Schedule, step: int):
        if self.bounded is None:
            raise RuntimeError("prepare() must be called before loss()")
        set_batchnorm_training(self.bounded, network.training)
        inputs = self.bound_input(x)
        logits = self.fused.logits(inputs, y) if self.fused is not None else self.bounded(inputs)
        clean = F.cross_entropy(logits, y)
        eps = schedule.eps_at(step)
        reg_scale = self.reg_weight * (1 - schedule.fraction(step)) if schedule.eps > 0 else 0.0
        want_robust, want_reg = eps > 0, reg_scale > 0
        self.last_terms = {}
        if not (want_robust or want_reg):
            return clean, logits
        num_classes = logits.shape[1]
        lower, upper = self.input_box(x, eps if want_robust else REG_MIN_EPS)
        robust, terms = self.robust_and_regularizer(lower, upper, y, num_classes, schedule, step,
                                                    want_robust, want_reg)
        if robust is None:
            loss = clean
        elif self.loss_mix == "robust":
            loss = robust
        else:
            kappa = schedule.kappa_at(step)
            loss = kappa * clean + (1 - kappa) * robust
        if want_reg:
            loss = loss + reg_scale * (terms["tightness"] + terms["relu"])
            self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        return loss, logits


class CrownIBPMethod(BoundTrainingMethod):
    """CROWN-IBP: beta·CROWN-IBP bound + (1-beta)·IBP bound, beta ramped from 1 to 0."""

    bound = "crown-ibp"

    def beta(self, schedule: Schedule, step: int) -> float:
        return schedule.beta_at(step)

    def combine_margins(self, ibp, lower, upper, y, num_classes, schedule, step) -> torch.Tensor:
        beta = self.beta(schedule, step)
        if beta < 1e-6:
            return ibp
        crown_ibp = margin_lower_bounds(self.bounded, lower, upper, y, num_classes, "crown-ibp")
        return beta * crown_ibp + (1 - beta) * ibp


def _check_rest(name: str, rest: dict[str, Any]) -> None:
    reject_unknown_options(name, rest, "init, reg_weight, reg_tol, loss_mix, loss_fusion")


@METHODS.register("ibp")
def ibp(eps: float = 0.0, init: str = "ibp", reg_weight: float = 0.5, reg_tol: float = 0.5,
        loss_mix: str = "robust", loss_fusion: bool = False, **rest: Any) -> TrainingMethod:
    """IBP certified training (defaults: Shi et al. 2021's initialisation, regularisers and loss)."""
    _check_rest("ibp", rest)
    return BoundTrainingMethod("ibp", init, reg_weight, reg_tol, loss_mix, loss_fusion)


@METHODS.register("crown-ibp")
def crown_ibp(eps: float = 0.0, init: str = "ibp", reg_weight: float = 0.5, reg_tol: float = 0.5,
              loss_mix: str = "robust", loss_fusion: bool = True, **rest: Any) -> TrainingMethod:
    """CROWN-IBP certified training (defaults: Shi et al. 2021's recipe, loss fusion on)."""
    _check_rest("crown-ibp", rest)
    return CrownIBPMethod("crown-ibp", init, reg_weight, reg_tol, loss_mix, loss_fusion)
