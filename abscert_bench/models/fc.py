"""Fully connected networks FC3 and FC5 (hidden width 256)."""
from __future__ import annotations

from torch import nn

from .registry import MODELS, activation

HIDDEN = 256


def fully_connected(channels: int, height: int, width: int, num_classes: int, act: str, depth: int) -> nn.Sequential:
    """`depth` linear layers: depth-1 hidden layers of width HIDDEN, then the classifier."""
    layers: list[nn.Module] = [nn.Flatten()]
    features = channels * height * width
    for _ in range(depth - 1):
        layers += [nn.Linear(features, HIDDEN), activation(act)]
        features = HIDDEN
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


@MODELS.register("fc3")
def fc3(channels: int, height: int, width: int, num_classes: int, act: str = "relu") -> nn.Module:
    """FC3: three linear layers."""
    return fully_connected(channels, height, width, num_classes, act, depth=3)


@MODELS.register("fc5")
def fc5(channels: int, height: int, width: int, num_classes: int, act: str = "relu") -> nn.Module:
    """FC5: five linear layers."""
    return fully_connected(channels, height, width, num_classes, act, depth=5)
