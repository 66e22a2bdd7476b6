"""Networks over the hull of reachable abstract inputs, in ops auto_LiRPA 0.3 and VNN-COMP tools read.

For the point variant the upper ends are a function of the lower ends, `upper = min(lower + d, 1)`,
written as `1 - relu(1 - lower - d)` (auto_LiRPA 0.3 has no Clip). Bounding this network over a box of
lower ends keeps that correlation, which the plain 2C-channel box would lose.
"""
from __future__ import annotations

import torch
from torch import nn


class PointHullNetwork(nn.Module):
    """Lower-end channels in; N([lower, min(lower + d, 1)]) out."""

    def __init__(self, network: nn.Module, d: float) -> None:
        super().__init__()
        self.network = network
        self.d = float(d)

    def forward(self, lower: torch.Tensor) -> torch.Tensor:
        upper = 1.0 - torch.relu(1.0 - (lower + self.d))
        return self.network(torch.cat([lower, upper], dim=1))
