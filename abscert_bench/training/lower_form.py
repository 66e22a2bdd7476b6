"""A faster, equivalent way to train N on phi(x) when every cell has width d (d = 1/K, the point variant).

phi(x) = [L, U] with U = L + d in every cell when d divides 1 (the last cell ends exactly at 1). N's first affine
layer (after the optional fixed Normalize) is linear in its input, and zero padding is linear too, so

    first(norm([L, L + d])) = conv(W_eff, L) + conv(W, c)        W_eff[:, i] = W[:, i]/s_i + W[:, C+i]/s_{C+i}

with c the constant 1×2C×H×W image [-m_i/s_i, (d - m_{C+i})/s_{C+i}] (m, s the normalisation; 0 and 1 without
one). The first layer then reads C channels, as natural training does, plus one single-image convolution per step
for the constant term. The function and its gradients are those of N(phi(x)) up to float32 rounding (U - L is
d to within one ulp); the trained parameters are N's own, and the deployed classifier is still N(phi(x)).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.registry import Normalize


def divides_one(d: float) -> bool:
    """True when 1/d is an integer K (every cell, the last included, has width exactly d)."""
    k = round(1.0 / d)
    return k >= 1 and math.isclose(k * d, 1.0, rel_tol=0.0, abs_tol=1e-12)


def split_first_layer(network: nn.Module) -> tuple[Normalize | None, nn.Module, nn.Module] | None:
    """(normalisation or None, first affine layer, the layers after it), or None when N has another shape."""
    if not isinstance(network, nn.Sequential):
        return None
    layers = list(network)
    start, norm = 0, None
    if layers and isinstance(layers[0], Normalize):
        norm, start = layers[0], 1
    if start < len(layers) and isinstance(layers[start], nn.Sequential):  # create_model's Sequential(Normalize, body)
        inner = split_first_layer(layers[start])
        if inner is None or inner[0] is not None:
            return None
        return norm, inner[1], nn.Sequential(inner[2], *layers[start + 1:])
    if start < len(layers) and isinstance(layers[start], nn.Conv2d) and layers[start].groups == 1 \
            and layers[start].padding_mode == "zeros":
        return norm, layers[start], nn.Sequential(*layers[start + 1:])
    if start + 1 < len(layers) and isinstance(layers[start], nn.Flatten) and isinstance(layers[start + 1], nn.Linear):
        return norm, layers[start + 1], nn.Sequential(*layers[start + 2:])
    return None


def _affine(layer: nn.Module, inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(inputs, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(inputs.flatten(1), weight, bias)


def lower_forward(network: nn.Module, lower: torch.Tensor, d: float) -> torch.Tensor | None:
    """N(phi(x)) computed from the cell lower ends L alone (see the module docstring); None if N has another shape."""
    parts = split_first_layer(network)
    if parts is None:
        return None
    norm, first, rest = parts
    assert isinstance(first, (nn.Conv2d, nn.Linear))  # split_first_layer returns one of the two
    channels = lower.shape[1]
    mean = norm.mean.flatten() if norm is not None else torch.zeros(2 * channels, device=lower.device)
    std = norm.std.flatten() if norm is not None else torch.ones(2 * channels, device=lower.device)
    weight = first.weight
    if isinstance(first, nn.Conv2d):
        scale = (1.0 / std).view(1, -1, 1, 1)
        scaled = weight * scale
        w_eff = scaled[:, :channels] + scaled[:, channels:]
        constant = torch.cat([-mean[:channels] / std[:channels], (d - mean[channels:]) / std[channels:]])
        const_image = constant.view(1, -1, 1, 1).expand(1, 2 * channels, *lower.shape[2:])
    else:
        features = lower[0].numel()
        per_feature = (1.0 / std).repeat_interleave(features // channels)
        scaled = weight * per_feature
        w_eff = scaled[:, :features] + scaled[:, features:]
        constant = torch.cat([-mean[:channels] / std[:channels], (d - mean[channels:]) / std[channels:]])
        const_image = constant.repeat_interleave(features // channels).view(1, -1)
    out = _affine(first, lower, w_eff, None) + _affine(first, const_image, weight, first.bias)
    return rest(out)
