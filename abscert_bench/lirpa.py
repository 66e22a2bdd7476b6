"""auto_LiRPA glue of the core: BoundedModules of plain networks and margin bounds over an input box.

Shared by the sound AbsCert verifier, the VNN-COMP run-back, the public API and the baselines (which add their
training losses on top, in `abscert_bench_baselines`). auto_LiRPA itself is imported only when a function here
runs, always through `lirpa_compat.lirpa()` (the torch 2 / numpy 2 shims).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .lirpa_compat import lirpa
from .margins import margin_rows

# Names of our bound methods → auto_LiRPA's `compute_bounds(method=...)` strings.
LIRPA_METHODS = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN", "alpha-crown": "alpha-CROWN"}


def margin_matrix(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C with rows e_y - e_j for every j != y: C·logits are the margins (N × (K-1) × K)."""
    rows = np.stack([margin_rows(int(label), num_classes) for label in y.tolist()])
    return torch.as_tensor(rows, dtype=torch.float32, device=y.device)


def bounded_input(lower: torch.Tensor, upper: torch.Tensor):
    """auto_LiRPA BoundedTensor of the box [lower, upper] (an L∞ perturbation around its centre)."""
    lib = lirpa()
    return lib.BoundedTensor((lower + upper) / 2, lib.PerturbationLpNorm(norm=float("inf"), x_L=lower, x_U=upper))


def build_bounded(model: nn.Module, network: nn.Module, inputs: torch.Tensor | tuple, bound_opts: dict | None, device,
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
    return build_bounded(network, network, torch.zeros_like(example[:1]), bound_opts, example.device)


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


def margin_lower_bounds(
    bounded, lower: torch.Tensor, upper: torch.Tensor, y: torch.Tensor, num_classes: int, method: str
) -> torch.Tensor:
    """Lower bounds of logit[y] - logit[j] for all j != y over the box [lower, upper] (N × (K-1))."""
    c = margin_matrix(y, num_classes)
    lb, _ = bounded.compute_bounds(x=(bounded_input(lower, upper),), C=c, method=LIRPA_METHODS[method],
                                   bound_upper=False)
    return lb


