"""Device handling in one place: where a module lives, and running a module on its device from CPU code."""
from __future__ import annotations

import torch
from torch import nn


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a module with neither)."""
    for tensor in module.parameters():
        return tensor.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


class OnDevice(nn.Module):
    """Runs `module` on its own device for inputs that live anywhere; returns outputs on the input's device.

    The sound verifier keeps its bookkeeping (reachable options, counterexamples) in CPU numpy and calls the
    network through this wrapper, so `--device cuda` puts every forward pass on the GPU; the copies are
    differentiable, so gradients of the discrete attack flow back to the CPU inputs.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        device = module_device(self.module)
        return self.module(inputs.to(device)).to(inputs.device)
