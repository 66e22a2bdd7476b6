"""The public Python API: AbsCert and the baselines on *your* `nn.Module`, tensors and DataLoaders.

Everything the CLI and the harness do is reachable from here without a run directory (docs/api.md):

- `Abstraction` (phi, its inverse cell view `preimage`, the reachable cells `reachable`) and
  `reachable_choices` (the exact reachable abstract inputs of an eps-ball, as abscert-sound enumerates them);
- `train(module, loader, method=...)`: AbsCert (or IBP / CROWN-IBP / natural / any registered method) training of
  a module on a DataLoader, with `on_step` / `on_epoch` callbacks; returns a `TrainedModel`;
- `model(module, abstraction)`: wrap an already-trained module as the `TrainedModel` the verifiers take;
- `bounded_hull(model, x, eps)`: the exact sound hull of a deployed AbsCert classifier as an auto_LiRPA
  (`BoundedModule`, `BoundedTensor`) pair; `bounded_ball` the same for a standard network;
- `verify(model, x, y, eps, verifiers=[...])`: per-sample status, time and counterexamples of any registered
  verifier; `results_frame` turns them into a pandas DataFrame;
- `export_vnncomp(model, x, y, eps, out)`: a checked VNN-COMP folder (ONNX + VNN-LIB + instances.csv).

Device-agnostic: work happens where the module's parameters live (or on `device=` where a function takes it).
auto_LiRPA is imported only by the functions that bound, always through `abscert_bench.lirpa_compat`.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .abstraction import Abstraction, ball, check_eps
from .devices import module_device
from .errors import UserError
from .sound.choices import PixelOptions, reachable_options
from .trained import TrainedModel
from .training import METHODS, create_method
from .training.config import TRAIN_FIELD_DEFAULTS, config_from_settings
from .training.loop import model_config_of, train_step, training_schedule
from .verification import VERIFIERS, SampleResult
from .verification.run import run_verifiers

__all__ = [
    "BoundedPair", "bounded_ball", "bounded_hull", "export_vnncomp", "model", "reachable_choices", "results_frame",
    "train", "verify",
]

Batches = Iterable[Sequence[torch.Tensor]]  # a DataLoader (or any iterable) of (images, labels) batches


# --------------------------------------------------------------------------------------------- models


def model(module: nn.Module | TrainedModel, abstraction: Abstraction | None = None,
          input_shape: Sequence[int] | None = None, num_classes: int | None = None,
          name: str | None = None) -> TrainedModel:
    """The `TrainedModel` view of a plain module: N and the abstraction in front of it (None: a standard network).

    `module` is N: for an AbsCert model it takes the 2C-channel abstract input phi(x). `input_shape` (C, H, W) of
    the raw images and `num_classes` are found by running N once when not given (the shape must then be given:
    a module does not know its input size). A `TrainedModel` is returned as it is.
    """
    if isinstance(module, TrainedModel):
        return module
    if not isinstance(module, nn.Module):
        raise UserError(f"expected an nn.Module, got {type(module).__name__}")
    if input_shape is None:
        raise UserError("input_shape (C, H, W of the raw images) is needed to wrap a plain module")
    shape = [int(v) for v in input_shape]
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    if num_classes is None:
        num_classes = _output_width(module, shape, abstraction)
    config = {"model": name or type(module).__name__, "input_shape": shape, "num_classes": int(num_classes),
              "abstraction": abstraction.to_dict() if abstraction else None}
    return TrainedModel(module, config, abstraction)


def _output_width(module: nn.Module, shape: list[int], abstraction: Abstraction | None) -> int:
    """Number of logits N gives for one (abstracted) example image."""
    example = torch.zeros(1, *shape, device=module_device(module))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(abstraction(example) if abstraction is not None else example)
    except RuntimeError as exc:
        given = abstraction(example) if abstraction is not None else example
        raise UserError(f"the module does not take {'abstract ' if abstraction else ''}inputs of shape "
                        f"{tuple(given.shape[1:])}: {exc}") from None
    finally:
        module.train(was_training)
    if out.dim() != 2:
        raise UserError(f"the module must return N×K logits, got shape {tuple(out.shape)}")
    return int(out.shape[1])


# --------------------------------------------------------------------------------------------- training


def train(
    module: nn.Module, loader: Batches, method: str = "abscert", *, eps: float, test_loader: Batches | None = None,
    device: str | torch.device | None = None, on_step: Callable[[dict[str, Any]], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None, **settings: Any,
) -> TrainedModel:
    """Train `module` (N) with a registered training method on the (images, labels) batches of `loader`.

    Images are raw [0, 1] tensors N×C×H×W. `method` is any name in `METHODS` ('abscert', 'ibp', 'crown-ibp',
    'natural', the reachable-input AbsCert variants 'abscert-adv', 'abscert-random', 'abscert-ibp',
    'abscert-crown-ibp', or a plugin's); `eps` is the L∞ radius (AbsCert: of the abstraction; IBP / CROWN-IBP: the
    target of the eps schedule). `settings` are `TrainConfig` fields (epochs, lr, warmup_epochs, ramp_epochs, kappa_end,
    grad_norm, lr_schedule, lr_milestones, lr_decay, lr_warmup_epochs, lr_cycles, seed; defaults as for the CLI)
    plus the method's own options (AbsCert: d, variant; IBP: init, reg_weight, …). Optimiser: Adam, as the loop of
    `abscert-bench train`. `on_step(row)` is called after every optimiser step (epoch, step, loss, lr, eps),
    `on_epoch(row)` after every epoch (epoch, loss, train_acc, test_acc when `test_loader` is given, train_time_s).
    Returns the trained model (the module is trained in place and left in eval mode, on its device).
    """
    if not isinstance(module, nn.Module):
        raise UserError(f"expected an nn.Module, got {type(module).__name__}")
    METHODS.get(method)  # an unknown name: the UserError listing the valid ones, before anything runs
    run = {"seed": settings.pop("seed")} if "seed" in settings else {}
    known = {k: v for k, v in settings.items() if k in TRAIN_FIELD_DEFAULTS}
    method_options = {k: v for k, v in settings.items() if k not in TRAIN_FIELD_DEFAULTS}
    for unsupported in ("budget_s", "device", "batch_size"):
        if unsupported in known:
            raise UserError(f"train(): {unsupported} is not a setting here (the loader sets the batches; pass "
                            f"device= for the device; training budgets belong to the CLI and the harness)")
    config = config_from_settings(known, dataset="loader", model=type(module).__name__, method=method,
                                  eps=float(eps), method_options=method_options, **run)
    config.validate()
    training = create_method(method, config.eps, **method_options)
    target = torch.device(device) if device is not None else module_device(module)
    network = module.to(target)
    torch.manual_seed(config.seed)
    first = _first_batch(loader)
    x0 = first[0].to(target)
    check_images(x0)
    abstraction = training.abstraction()
    shape = list(x0.shape[1:])
    num_classes = _output_width(network, shape, abstraction)
    trained = TrainedModel(network, model_config_of(config.model, shape, num_classes, training, config.activation),
                           abstraction)
    try:
        steps_per_epoch = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise UserError("the loader must have a length (a DataLoader or a list of batches)") from None
    if steps_per_epoch < 1:
        raise UserError("the loader yields no batches")
    schedule = training_schedule(config, steps_per_epoch)
    training.prepare(network, training.network_input(x0[:1]))
    optimizer = torch.optim.Adam(network.parameters(), lr=config.lr)
    step = 0
    for epoch in range(1, config.epochs + 1):
        network.train()
        total, correct, seen, start = 0.0, 0, 0, time.perf_counter()
        for batch in loader:
            x, y = batch[0].to(target), batch[1].to(target)
            lr = config.lr * config.lr_factor(step / steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, logits = train_step(training, network, optimizer, x, y, schedule, step, config.grad_norm)
            if not math.isfinite(float(loss)):
                raise UserError(f"training diverged (loss is NaN) at epoch {epoch}, step {step}; lower lr")
            total += float(loss) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            if on_step is not None:
                on_step({"epoch": epoch, "step": step, "loss": float(loss), "lr": lr,
                         "eps": schedule.eps_at(step) if training.uses_eps_schedule else config.eps})
            step += 1
        row: dict[str, Any] = {"epoch": epoch, "loss": total / max(1, seen), "train_acc": correct / max(1, seen),
                               "train_time_s": time.perf_counter() - start, "images": seen}
        if test_loader is not None:
            row["test_acc"] = accuracy(trained, test_loader)
        if on_epoch is not None:
            on_epoch(row)
    network.eval()
    return trained


def _first_batch(loader: Batches) -> Sequence[torch.Tensor]:
    for batch in loader:
        if len(batch) < 2:
            raise UserError("the loader must yield (images, labels) batches")
        return batch
    raise UserError("the loader yields no batches")


def accuracy(trained: TrainedModel, loader: Batches) -> float:
    """Clean accuracy of the deployed classifier (N(phi(x)) for AbsCert) over the batches of `loader`."""
    classifier = trained.classifier()
    device = module_device(trained.network)
    classifier.eval()
    correct = seen = 0
    with torch.no_grad():
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            correct += int((classifier(x).argmax(1) == y).sum())
            seen += len(y)
    return correct / max(1, seen)


def check_images(x: torch.Tensor) -> None:
    """Raw images: an N×C×H×W float tensor with finite values in [0, 1]."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise UserError(f"images must be an N×C×H×W float tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not torch.isfinite(x).all() or (x.numel() and (float(x.min()) < 0 or float(x.max()) > 1)):
        raise UserError("images must be finite raw pixels in [0, 1]")


def check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    """Raw images (see `check_images`) and one label per image (a 1-D tensor)."""
    check_images(x)
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or len(y) != len(x):
        raise UserError(f"labels must be a 1-D tensor of {len(x)} class ids")


# --------------------------------------------------------------------------------------------- auto_LiRPA


class BoundedPair(NamedTuple):
    """An auto_LiRPA `BoundedModule` and the `BoundedTensor` of its input box: unpack and bound as usual,
    `module.compute_bounds(x=(input,), method="CROWN")` (bounds on the logits of N, one row per image)."""

    module: Any
    input: Any


def bounded_hull(trained: TrainedModel | nn.Module, x: torch.Tensor, eps: float,
                 abstraction: Abstraction | None = None) -> BoundedPair:
    """The exact sound hull of the deployed AbsCert classifier N(phi(x')) over the clipped eps-balls around x.

    The module is the gap form the abscert-sound verifier bounds (sound/bounds.py): its input is [lower ends,
    gaps] (2C channels; the fold of `upper = lower + gap` into N's first layer where possible), and its input box
    spans every abstract input reachable from the ball (float32 rounding included) while every vertex is an
    abstract input N really receives. So any bound auto_LiRPA computes on it (IBP, CROWN, alpha-CROWN, with a C
    matrix or not) contains N(phi(x')) for every x' in the ball. Point variant only for the gap form; the region
    variant's hull is the plain 2C box, also returned here.
    """
    from .sound.bounds import HullBounder

    trained = _abscert_model(trained, x, abstraction)
    check_images(x)
    eps = check_eps(eps)
    bounder = HullBounder(trained)
    assert trained.abstraction is not None  # _abscert_model refuses standard networks
    options = reachable_choices(trained.abstraction, x.detach().cpu(), eps)
    lower, upper = bounder.root_box(options)
    from .lirpa import bounded_input

    return BoundedPair(bounder.bounded, bounded_input(lower, upper))


def bounded_ball(network: nn.Module, x: torch.Tensor, eps: float) -> BoundedPair:
    """A standard network on the [0,1]-clipped L∞ eps-ball around x, as an auto_LiRPA pair (what `ibp` / `crown`
    bound; BatchNorm in eval mode, parameters shared with `network`)."""
    from .lirpa import bounded_input, bounded_module

    check_images(x)
    lower, upper = ball(x, check_eps(eps))
    return BoundedPair(bounded_module(network.eval(), x), bounded_input(lower, upper))


def reachable_choices(abstraction: Abstraction, x: torch.Tensor, eps: float) -> PixelOptions:
    """Per pixel of every image, the abstract values any x' of the clipped eps-ball reaches (with a concrete pixel
    producing each): exact for float32 pixels, found with the abstraction itself as the oracle."""
    check_images(x)
    return reachable_options(abstraction, x.detach().cpu(), check_eps(eps))


def _abscert_model(trained: TrainedModel | nn.Module, x: torch.Tensor,
                   abstraction: Abstraction | None) -> TrainedModel:
    if isinstance(trained, TrainedModel):
        if abstraction is not None and trained.abstraction != abstraction:
            raise UserError("the abstraction given differs from the model's own")
        if trained.abstraction is None:
            raise UserError("this model has no abstraction (a standard network): use bounded_ball")
        return trained
    if abstraction is None:
        raise UserError("a plain module needs abstraction= (the phi in front of it)")
    return model(trained, abstraction, input_shape=tuple(x.shape[1:]))


# --------------------------------------------------------------------------------------------- verify, export


def verify(
    trained: TrainedModel | nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
    verifiers: Sequence[str] = ("abscert-sound",), abstraction: Abstraction | None = None,
    options: dict[str, dict[str, Any]] | None = None, batch_size: int = 64, cascade: bool = False,
) -> dict[str, list[SampleResult]]:
    """Run registered verifiers on images x (raw [0,1]) with labels y at L∞ radius eps.

    Returns, per verifier name (or one 'cascade:a+b' entry with `cascade`), one `SampleResult` per image: status
    'verified' / 'falsified' / 'unknown', `time_s`, `counterexample` (a raw image in the ball, exactly when
    falsified) and `details`. `options` maps a verifier name to its builder options, e.g.
    {"abscert-sound": {"timeout": 5}}. A plain module is wrapped with `model(module, abstraction)`.
    """
    check_batch(x, y)
    if isinstance(verifiers, str):
        verifiers = [verifiers]
    unknown = [v for v in (options or {}) if v not in verifiers]
    if unknown:
        raise UserError(f"options given for verifiers not run: {', '.join(unknown)}")
    trained = model(trained, abstraction, input_shape=tuple(x.shape[1:]))
    device = module_device(trained.network)
    runs = run_verifiers(trained, x.to(device), y.to(device), check_eps(eps), list(verifiers), options or {},
                         cascade=cascade, batch_size=batch_size)
    return {name: results for name, _, results in runs}


def results_frame(results: dict[str, list[SampleResult]]):
    """The per-sample results of `verify` as one pandas DataFrame (verifier, index, label, status, time_s,
    decided_by, counterexample: bool, details as columns)."""
    import pandas as pd

    rows = [{"verifier": name, "index": r.index, "label": r.label, "status": r.status, "time_s": r.time_s,
             "decided_by": r.decided_by, "counterexample": r.counterexample is not None, **r.details}
            for name, answers in results.items() for r in answers]
    return pd.DataFrame(rows)


def export_vnncomp(trained: TrainedModel | nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, out: str | Path,
                   abstraction: Abstraction | None = None, timeout: float = 60.0, vnnlib2: bool = False,
                   force: bool = False, indices: Sequence[int] | None = None,
                   dataset: str = "user data", gzip: bool = False) -> dict[str, Any]:
    """Export the model and images as a checked VNN-COMP benchmark folder at `out` (no run directory needed).

    Writes the encodings of `abscert-bench export` (a standard network; or AbsCert hull + deployed + N), one
    VNN-LIB property per (encoding, image), instances.csv, images.npz, benchmark.json and README.md. Every
    ONNX file is checked against torch with onnx.checker, onnxruntime and our loader, every property is read
    back, before the folder is moved into place; `benchmark.json`'s `checks` records the results. An existing
    non-empty `out` needs `force`. `gzip`: store `.onnx.gz` / `.vnnlib.gz` (VNN-COMP 2024). Returns the metadata.
    """
    from .vnncomp.benchmark import write_benchmark

    check_batch(x, y)
    trained = model(trained, abstraction, input_shape=tuple(x.shape[1:]))
    index_list = list(range(len(x))) if indices is None else [int(i) for i in indices]
    if len(index_list) != len(x):
        raise UserError(f"indices must name the {len(x)} images")
    cpu = TrainedModel(copy.deepcopy(trained.network).cpu().eval(), trained.model_config, trained.abstraction)
    return write_benchmark(cpu, x.detach().cpu(), y.detach().cpu(), index_list, Path(out), check_eps(eps), timeout,
                           vnnlib2, force, {"dataset": dataset, "samples": len(x)}, gzip)


def registered() -> dict[str, list[str]]:
    """Every registered training method, verifier, model and dataset (built-ins and plugins), by kind."""
    from .data import DATASETS
    from .models import MODELS

    return {"methods": METHODS.names(), "verifiers": VERIFIERS.names(), "models": MODELS.names(),
            "datasets": DATASETS.names()}
