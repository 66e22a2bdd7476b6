"""A rough, relative cost estimate per cell, used to hand cells to Dask workers longest first.

Longest-processing-time-first list scheduling keeps a few expensive cells (CROWN-IBP training, α-CROWN on a
large model) from starting last and leaving the other workers idle at the end of a suite. The estimate only
has to order cells, not predict seconds: it is the multiply-accumulates of one forward pass of the model
(counted once per (model, input shape) with forward hooks) times per-image work factors for training and for
each verifier, measured once on the embedded digits (see `TRAIN_FACTORS`, and each verifier's registered `cost`).
"""
from __future__ import annotations

import functools
from typing import Any

# Input shapes of the registered datasets, for the estimate only (a cell with data.resize uses that shape).
NOMINAL_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32),
}
# Work per training image and epoch, relative to natural training (from `abscert-bench bench`: IBP ~3x,
# CROWN-IBP ~10-50x during the eps ramp and IBP-like after it).
TRAIN_FACTORS = {"natural": 1.0, "abscert": 1.0, "ibp": 3.0, "crown-ibp": 3.0,
                 # issue 14's methods, final-model train seconds against abscert's in results/sound-training
                 # (MNIST DM_Small eps 0.1, 20 epochs: abscert 79 s, adv 518, random 267, ibp 429, crown-ibp 569)
                 "abscert-adv": 6.5, "abscert-random": 3.4, "abscert-ibp": 5.4, "abscert-crown-ibp": 7.2}
RAMP_FACTORS = {"crown-ibp": 6.0}  # with loss fusion (the default): ~6x natural; unfused ~27x
# Work per verified sample, in the same unit (one natural training image-epoch; measured on DM_Small, digits), is
# each verifier's `cost` in its registration (abscert_bench.verification.base.VerifierMeta).
ABSCERT_SEARCH_FRACTION = 0.9  # the granularity search trains each candidate on 90 % of the training split


@functools.lru_cache(maxsize=64)
def forward_macs(model: str, shape: tuple[int, int, int], num_classes: int = 10) -> int:
    """Multiply-accumulates of one forward pass of registry model `model` on one input of `shape`."""
    import torch
    from torch import nn

    from ..models import create_model

    network = create_model(model, shape, num_classes)
    total = 0

    def count(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output.numel() * (module.in_channels // module.groups) * \
                module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in network.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        network.eval()(torch.zeros(1, *shape))
    for hook in hooks:
        hook.remove()
    return total


def estimate_cell_cost(params: dict[str, Any], train_images: int = 2000) -> float:
    """Relative cost of a cell (train + every verifier); only the order between cells is meaningful."""
    from types import SimpleNamespace

    from ..verification.base import create_verifier, verifier_meta
    from .spec import VERIFIER_LIMIT, cell_method

    abstraction = cell_method(params).abstraction()
    model_kind: Any = SimpleNamespace(abstraction=abstraction)  # for a TrainedModel: all `Verifier.applies_to` reads
    shape = tuple(params.get("resize") or NOMINAL_SHAPES.get(params["dataset"], (1, 28, 28)))
    channels = shape[0] * (2 if abstraction is not None else 1)
    try:
        macs = forward_macs(params["model"], (channels, shape[1], shape[2]))
    except Exception:  # noqa: BLE001  an estimate must never stop a suite
        macs = 1_000_000
    train, verify = params["train"], params["verify"]
    images = int(train.get("limit") or 0) or train_images
    method = params["method"]
    epochs = int(train["epochs"])
    ramp = min(epochs, int(train.get("ramp_epochs", 0)))
    per_image = TRAIN_FACTORS.get(method, 3.0) * (epochs - ramp) + RAMP_FACTORS.get(method, TRAIN_FACTORS.get(
        method, 3.0)) * ramp
    grid = params["method_options"].get("d")
    if isinstance(grid, list) and len(grid) > 1:
        per_image *= 1 + ABSCERT_SEARCH_FRACTION * len(grid)
    samples = int(verify["limit"])
    per_sample = sum(verifier_meta(name).cost * min(samples, int(verify["options"].get(name, {}).get(
        VERIFIER_LIMIT, samples))) for name in verify["verifiers"] if create_verifier(name).applies_to(model_kind))
    return macs * (3.0 * images * per_image + per_sample)
