"""ResNet-18 (CIFAR layout, no torchvision): 3×3 stem, four stages of two basic blocks, average pool, linear.

Built from plain modules (Conv2d, ReLU, Add inside `ResidualBlock`, AvgPool2d, Flatten, Linear) so auto_LiRPA 0.3
can wrap it (IBP, CROWN). There is no BatchNorm: certified training usually drops or freezes it, and its batch
statistics make bounds in training mode differ from the deployed network. Instead, the last convolution of each
block starts at zero ("zero-init residual"), so every block is the identity at initialisation and the deep network
trains without normalisation. Any input of at least 1×1 works: stage strides are skipped once the map is 1×1.
"""
from __future__ import annotations

import torch
from torch import nn

from .registry import MODELS, activation, conv_output_size

STAGES = [(64, 1), (128, 2), (256, 2), (512, 2)]  # (width, stride of the first block)
BLOCKS_PER_STAGE = 2


class ResidualBlock(nn.Module):
    """Basic block: act(conv3x3 → act → conv3x3 + shortcut(x)); 1×1 conv shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, act: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.act1 = activation(act)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        self.act2 = activation(act)
        nn.init.zeros_(self.conv2.weight)
        assert self.conv2.bias is not None  # bias=True
        nn.init.zeros_(self.conv2.bias)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.conv2(self.act1(self.conv1(x))) + self.shortcut(x))


@MODELS.register("resnet18")
def resnet18(channels: int, height: int, width: int, num_classes: int, act: str = "relu") -> nn.Module:
    """ResNet-18: 3×3 stem (64), stages 64/128/256/512 of two basic blocks each, global average pool, linear."""
    layers: list[nn.Module] = [nn.Conv2d(channels, 64, 3, padding=1), activation(act)]
    in_channels = 64
    for out_channels, stage_stride in STAGES:
        for block in range(BLOCKS_PER_STAGE):
            stride = stage_stride if block == 0 and min(height, width) > 1 else 1
            layers.append(ResidualBlock(in_channels, out_channels, stride, act))
            height, width = conv_output_size(height, 3, stride, 1), conv_output_size(width, 3, stride, 1)
            in_channels = out_channels
    if height > 1 or width > 1:
        layers.append(nn.AvgPool2d((height, width)))
    layers += [nn.Flatten(), nn.Linear(in_channels, num_classes)]
    return nn.Sequential(*layers)
