"""DeepMind's DM_Small / DM_Medium / DM_Large (Gowal et al. 2018), padded so any input ≥ 4×4 works.

`dm_small_bn` / `dm_medium_bn`: the same shapes with BatchNorm after every convolution and hidden linear layer
(before the activation), as Shi et al. 2021 add BN to every layer for IBP training.
"""
from __future__ import annotations

from torch import nn

from ..errors import UserError
from .registry import MODELS, activation, conv_output_size

# (out_channels, kernel, stride, padding) per conv layer, then hidden linear widths.
DM_SHAPES: dict[str, tuple[list[tuple[int, int, int, int]], list[int]]] = {
    "dm_small": ([(16, 4, 2, 1), (32, 4, 1, 1)], [100]),
    "dm_medium": ([(32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1)], [512, 512]),
    "dm_large": ([(64, 3, 1, 1), (64, 3, 1, 1), (128, 3, 2, 1), (128, 3, 1, 1), (128, 3, 1, 1)], [512]),
}


def conv_net(
    name: str, channels: int, height: int, width: int, num_classes: int, act: str,
    convs: list[tuple[int, int, int, int]], hidden: list[int], batch_norm: bool = False,
) -> nn.Sequential:
    """Convolutions (each followed by the activation), flatten, hidden linear layers, classifier.

    With `batch_norm`, a BatchNorm2d / BatchNorm1d sits between every convolution / hidden linear layer and
    its activation (not after the classifier).
    """
    layers: list[nn.Module] = []
    for out, kernel, stride, pad in convs:
        layers.append(nn.Conv2d(channels, out, kernel, stride=stride, padding=pad))
        layers += [nn.BatchNorm2d(out)] if batch_norm else []
        layers.append(activation(act))
        channels = out
        height = conv_output_size(height, kernel, stride, pad)
        width = conv_output_size(width, kernel, stride, pad)
        if height < 1 or width < 1:
            raise UserError(f"input too small for {name}")
    features = channels * height * width
    layers.append(nn.Flatten())
    for size in hidden:
        layers.append(nn.Linear(features, size))
        layers += [nn.BatchNorm1d(size)] if batch_norm else []
        layers.append(activation(act))
        features = size
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


def _register(name: str, shapes: str, batch_norm: bool = False) -> None:
    convs, hidden = DM_SHAPES[shapes]

    def build(channels: int, height: int, width: int, num_classes: int, act: str = "relu") -> nn.Module:
        return conv_net(name, channels, height, width, num_classes, act, convs, hidden, batch_norm)

    build.__doc__ = f"{name}: convolutions {convs}, hidden {hidden}" + (", BatchNorm before every activation."
                                                                         if batch_norm else ".")
    MODELS.add(name, build)


for _name in DM_SHAPES:
    _register(_name, _name)
for _name in ("dm_small", "dm_medium"):
    _register(f"{_name}_bn", _name, batch_norm=True)
