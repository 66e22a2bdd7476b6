"""Training-side bounds of the baselines: auto_LiRPA loss fusion and the worst-case logits of a margin bound."""
from __future__ import annotations

import torch
from torch import nn

from abscert_bench.lirpa import bounded_input, build_bounded, lirpa


class FusedLoss:
    """Loss fusion (auto_LiRPA's CrossEntropyWrapper with bound_opts {'loss_fusion': True}).

    The bounded graph is s(x, y) = sum_j exp(f_j(x) - f_y(x)), whose log is the cross-entropy; an upper bound of s over
    the box is an upper bound of the worst-case CE, found with one bound of a scalar output instead of K-1 margins.
    """

    def __init__(self, module: nn.Module, example: torch.Tensor, bound_opts: dict | None = None,
                 network: nn.Module | None = None, prefix: str = "") -> None:
        """`module` is bounded; `network` (default: `module`) is the trained network inside it, whose parameters
        and buffers carry the name prefix `prefix` in `module`."""
        lib = lirpa()
        wrapper = lib.CrossEntropyWrapper(module)
        inputs = (torch.zeros_like(example[:1]), torch.zeros(1, dtype=torch.long, device=example.device))
        self.bounded = build_bounded(wrapper, module if network is None else network, inputs,
                                     {**(bound_opts or {}), "loss_fusion": True}, example.device,
                                     prefix="model." + prefix)
        nodes = list(self.bounded._modules.values())
        subs = [n for n in nodes if type(n).__name__ == "BoundSub"
                and type(n.inputs[1]).__name__ == "BoundGatherElements"]
        exps = [n for n in nodes if type(n).__name__ == "BoundExp"]
        if len(subs) != 1 or len(exps) != 1:
            raise RuntimeError("unexpected CrossEntropyWrapper graph")
        self.logits_node, self.gather_node, self.exp_node = subs[0].inputs[0], subs[0].inputs[1], exps[0]

    def logits(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Clean forward pass (sets BatchNorm's batch statistics in train mode); returns the network's logits."""
        self.bounded(x, y)
        return self.logits_node.forward_value

    def robust_ce(self, lower: torch.Tensor, upper: torch.Tensor, y: torch.Tensor, method: str,
                  beta: float = 1.0, after_ibp=None) -> torch.Tensor:
        """Per-sample upper bounds of max CE over the box: IBP, or for 'crown-ibp' beta·CROWN-IBP + (1-beta)·IBP
        bounds of s (mixed in s, as Shi et al.'s and auto_LiRPA's training code do). `after_ibp()` is called right
        after the IBP pass, while every node holds its IBP bounds."""
        # auto_LiRPA 0.3's BoundGatherElements back-propagates with the index of its last *forward* call, which the
        # loss-fusion IBP shortcut skips: without this, the CROWN pass would use stale labels (an unsound bound).
        self.gather_node.index = y.unsqueeze(-1)
        _, ibp_ub = self.bounded.compute_bounds(x=(bounded_input(lower, upper), y), method="IBP")
        ibp_shift = self.exp_node.max_input  # BoundExp subtracts the largest upper end before exp; add it back
        ibp = torch.log(ibp_ub) + ibp_shift
        if after_ibp is not None:
            after_ibp()
        if method == "ibp" or beta < 1e-6:
            return ibp.flatten()
        if method != "crown-ibp":
            raise ValueError(f"loss fusion bounds with ibp or crown-ibp, not {method}")
        # the backward pass reuses the IBP bounds of every intermediate node computed just above (CROWN-IBP)
        _, crown_ub = self.bounded.compute_bounds(method="backward", IBP=False, bound_lower=False, bound_upper=True)
        crown = torch.log(crown_ub) + self.exp_node.max_input
        if beta >= 1 - 1e-6:
            return crown.flatten()
        top = torch.maximum(crown, ibp).detach()
        mixed = beta * torch.exp(crown - top) + (1 - beta) * torch.exp(ibp - top)
        return (torch.log(mixed) + top).flatten()


def worst_case_logits(margin_lb: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits whose cross-entropy is the usual robust loss: 0 for class y, -margin bound for the others."""
    n = y.shape[0]
    logits = torch.zeros(n, num_classes, device=margin_lb.device, dtype=margin_lb.dtype)
    mask = torch.ones(n, num_classes, dtype=torch.bool, device=y.device)
    mask[torch.arange(n), y] = False
    logits[mask] = -margin_lb.reshape(-1)
    return logits
