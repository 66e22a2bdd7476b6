"""LeNet-5 with average-pool subsampling; both convolutions padded by 2 so 8×8 inputs work."""
from __future__ import annotations

from torch import nn

from ..errors import UserError
from .registry import MODELS, activation


@MODELS.register("lenet5")
def lenet5(channels: int, height: int, width: int, num_classes: int, act: str = "relu") -> nn.Module:
    """LeNet-5: conv6-pool-conv16-pool-fc120-fc84-classifier."""
    h, w = height // 2 // 2, width // 2 // 2
    if h < 1 or w < 1:
        raise UserError(f"input too small for lenet5 ({height}×{width}; needs at least 4×4)")
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=2), activation(act), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5, padding=2), activation(act), nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * h * w, 120), activation(act),
        nn.Linear(120, 84), activation(act),
        nn.Linear(84, num_classes),
    )
