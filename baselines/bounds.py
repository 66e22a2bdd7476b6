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


def bounded_module(network: nn.Module, example: torch.Tensor, bound_opts: dict | None = None):
    """Wrap a plain network in auto_LiRPA's BoundedModule (parameters are shared, not copied)."""
    lib = lirpa()
    return lib.BoundedModule(network, torch.zeros_like(example[:1]), bound_opts=bound_opts, device=example.device)


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
