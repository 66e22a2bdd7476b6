"""Margin bounds through auto_LiRPA over an input box, shared by training and verification."""
from __future__ import annotations

import torch
from torch import nn

from abscert_bench.lirpa_compat import lirpa

# Names of our bound methods → auto_LiRPA's `compute_bounds(method=...)` strings.
LIRPA_METHODS = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN", "alpha-crown": "alpha-CROWN"}


def margin_matrix(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C with rows e_y - e_j for every j != y: C·logits are the margins (N × (K-1) × K)."""
    eye = torch.eye(num_classes, device=y.device)
    true_rows = eye[y].unsqueeze(1)  # N×1×K
    others = torch.stack([eye[[j for j in range(num_classes) if j != label]] for label in y.tolist()])
    return true_rows - others


def _build(model: nn.Module, network: nn.Module, inputs: torch.Tensor | tuple, bound_opts: dict | None, device,
           prefix: str = ""):
    """BoundedModule of `model`, converted with `network` in eval mode (its mode is restored afterwards).

    auto_LiRPA runs the model once on the one-sample example while converting: in train mode BatchNorm1d refuses a
    batch of 1 and BatchNorm2d would move the running statistics. The BoundedModule's BatchNorm nodes come out in
    eval mode (running statistics); `set_batchnorm_training` switches them.
    """
    lib = lirpa()
    was_training = network.training
    model.eval()
    network.eval()
    try:
        bounded = lib.BoundedModule(model, inputs, bound_opts=bound_opts, device=device)
    finally:
        network.train(was_training)
    share_buffers(bounded, network, prefix)
    set_batchnorm_training(bounded, False)
    return bounded


def bounded_module(network: nn.Module, example: torch.Tensor, bound_opts: dict | None = None):
    """Wrap a plain network in auto_LiRPA's BoundedModule (parameters and buffers are shared, not copied)."""
    return _build(network, network, torch.zeros_like(example[:1]), bound_opts, example.device)


def share_buffers(bounded, network: nn.Module, prefix: str = "") -> None:
    """Make the BoundedModule's buffer nodes hold the network's own buffer tensors.

    auto_LiRPA clones buffers (BatchNorm running mean / variance) into its graph, so a train-mode forward through
    the BoundedModule would update its copies only and the trained network would keep its initial statistics.
    """
    buffers = dict(network.named_buffers())
    for node in bounded._modules.values():
        if type(node).__name__ == "BoundBuffers":
            name = getattr(node, "ori_name", "")
            name = name[len(prefix):] if prefix and name.startswith(prefix) else name
            if name in buffers and buffers[name].shape == node.buffer.shape:
                node._buffers["buffer"] = buffers[name]


def set_batchnorm_training(bounded, training: bool) -> None:
    """Train mode: BatchNorm nodes normalise with the statistics of the last clean forward (auto_LiRPA's training
    semantics) and update the running ones; eval mode: they use the running statistics, as the deployed network."""
    for node in bounded._modules.values():
        if type(node).__name__ == "BoundBatchNormalization":
            node.train(training)


def relu_input_nodes(bounded) -> list:
    """The nodes feeding each ReLU (their `.lower` / `.upper` are the pre-activation bounds of the last pass)."""
    return [node.inputs[0] for node in bounded._modules.values() if type(node).__name__ == "BoundRelu"]


class FusedLoss:
    """Loss fusion (auto_LiRPA's CrossEntropyWrapper with bound_opts {'loss_fusion': True}).

    The bounded graph is s(x, y) = sum_j exp(f_j(x) - f_y(x)), whose log is the cross-entropy; an upper bound of s over
    the box is an upper bound of the worst-case CE, found with one bound of a scalar output instead of K-1 margins.
    """

    def __init__(self, network: nn.Module, example: torch.Tensor, bound_opts: dict | None = None) -> None:
        lib = lirpa()
        wrapper = lib.CrossEntropyWrapper(network)
        inputs = (torch.zeros_like(example[:1]), torch.zeros(1, dtype=torch.long, device=example.device))
        self.bounded = _build(wrapper, network, inputs, {**(bound_opts or {}), "loss_fusion": True},
                              example.device, prefix="model.")
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
        lib = lirpa()
        perturbation = lib.PerturbationLpNorm(norm=float("inf"), x_L=lower, x_U=upper)
        bounded_input = lib.BoundedTensor((lower + upper) / 2, perturbation)
        # auto_LiRPA 0.3's BoundGatherElements back-propagates with the index of its last *forward* call, which the
        # loss-fusion IBP shortcut skips: without this, the CROWN pass would use stale labels (an unsound bound).
        self.gather_node.index = y.unsqueeze(-1)
        _, ibp_ub = self.bounded.compute_bounds(x=(bounded_input, y), method="IBP")
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


def margin_lower_bounds(
    bounded, lower: torch.Tensor, upper: torch.Tensor, y: torch.Tensor, num_classes: int, method: str
) -> torch.Tensor:
    """Lower bounds of logit[y] - logit[j] for all j != y over the box [lower, upper] (N × (K-1))."""
    lib = lirpa()
    center = (lower + upper) / 2
    perturbation = lib.PerturbationLpNorm(norm=float("inf"), x_L=lower, x_U=upper)
    bounded_input = lib.BoundedTensor(center, perturbation)
    c = margin_matrix(y, num_classes)
    lb, _ = bounded.compute_bounds(x=(bounded_input,), C=c, method=LIRPA_METHODS[method], bound_upper=False)
    return lb


def worst_case_logits(margin_lb: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits whose cross-entropy is the usual robust loss: 0 for class y, -margin bound for the others."""
    n = y.shape[0]
    logits = torch.zeros(n, num_classes, device=margin_lb.device, dtype=margin_lb.dtype)
    mask = torch.ones(n, num_classes, dtype=torch.bool, device=y.device)
    mask[torch.arange(n), y] = False
    logits[mask] = -margin_lb.reshape(-1)
    return logits
