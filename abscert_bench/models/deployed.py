"""The deployed AbsCert classifier f(x) = N(abstraction(x))."""
from __future__ import annotations

import torch
from torch import nn

from ..abstraction import Abstraction


class DeployedClassifier(nn.Module):
    """Raw images in, logits out: the abstraction (phi or its region form) followed by the network N."""

    def __init__(self, abstraction: Abstraction, network: nn.Module) -> None:
        super().__init__()
        self.abstraction = abstraction
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.abstraction(x))
