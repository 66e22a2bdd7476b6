"""The model registry and the pieces every architecture shares (activation, normalisation)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def activation(name: str) -> nn.Module:
    """A fresh activation layer by name."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise UserError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}") from None


class Normalize(nn.Module):
    """Fixed per-channel (x - mean) / std as the model's first layer (raw [0,1] pixels in)."""

    mean: torch.Tensor  # buffers (register_buffer), declared for the type checker
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial size after a convolution."""
    return (size + 2 * padding - kernel) // stride + 1


def create_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    activation: str = "relu",
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
) -> nn.Module:
    """Build architecture `name` for inputs of shape (C, H, W); optional fixed normalisation first."""
    channels, height, width = (int(v) for v in input_shape)
    if channels <= 0 or height <= 0 or width <= 0 or num_classes < 2:
        raise UserError(f"bad model input shape {tuple(input_shape)} or class count {num_classes}")
    body = MODELS.get(name)(channels, height, width, num_classes, activation)
    if normalize is None:
        return body
    mean, std = normalize
    if len(mean) != channels or len(std) != channels:
        raise UserError(f"normalisation has {len(mean)} channels, the input has {channels}")
    return nn.Sequential(Normalize(mean, std), body)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
