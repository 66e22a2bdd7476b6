"""CNN7-BN, the 7-layer network of Shi et al. 2021 (`cnn_7layer_bn2`, their default `cnn`) and of CTBench.

Five 3×3 convolutions of 64, 64, 128 (stride 2), 128, 128 channels, padding 1, each followed by BatchNorm2d and the
activation; flatten; a 512-unit linear layer with BatchNorm1d and the activation; the linear classifier. On 28×28
and 32×32 inputs the stride-2 convolution halves the map (14×14 → 25,088 features, 16×16 → 32,768), as in the
references' `(in_dim // 2)**2 · 128`; on 8×8 digits it is 4×4 (2,048 features). Odd sizes round up.
"""
from __future__ import annotations

from torch import nn

from .registry import MODELS, activation, conv_output_size

CNN7_CONVS = [(64, 1), (64, 1), (128, 2), (128, 1), (128, 1)]  # (out_channels, stride), all 3×3, padding 1
CNN7_LINEAR = 512


@MODELS.register("cnn7")
def cnn7(channels: int, height: int, width: int, num_classes: int, act: str = "relu") -> nn.Module:
    """CNN7-BN: conv64-conv64-conv128/2-conv128-conv128 (BN + act after each), linear 512 (BN + act), classifier."""
    layers: list[nn.Module] = []
    for out, stride in CNN7_CONVS:
        layers += [nn.Conv2d(channels, out, 3, stride=stride, padding=1), nn.BatchNorm2d(out), activation(act)]
        channels = out
        height, width = conv_output_size(height, 3, stride, 1), conv_output_size(width, 3, stride, 1)
    layers += [nn.Flatten(), nn.Linear(channels * height * width, CNN7_LINEAR), nn.BatchNorm1d(CNN7_LINEAR),
               activation(act), nn.Linear(CNN7_LINEAR, num_classes)]
    return nn.Sequential(*layers)
