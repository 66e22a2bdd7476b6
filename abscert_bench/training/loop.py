"""The one training loop, shared by every method, and the AbsCert granularity search."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import Dataset
from ..errors import UserError
from ..official import (
    SELECTION,
    VALIDATION_FRACTION,
    check_protocol,
    given_recipe,
    official_candidates,
    paper_eps,
    recipe_for,
)
from ..rundir import write_csv, write_json
from ..trained import TrainedModel, build_network, save_checkpoint
from .config import TrainConfig, _as_list
from .methods import AbsCertMethod, TrainingMethod, create_method
from .schedule import Schedule


def resolve_device(name: str) -> torch.device:
    """torch.device for `name`; 'cuda' without a GPU is a UserError."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} requested but no CUDA device is available")
    return torch.device(name)


def evaluate(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Clean accuracy of a raw-image classifier."""
    classifier.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            correct += int((classifier(x[start:start + batch_size]).argmax(1) == y[start:start + batch_size]).sum())
    return correct / max(1, len(x))


def training_schedule(config: TrainConfig, steps_per_epoch: int) -> Schedule:
    """The eps / kappa schedule of `config` over its epochs of `steps_per_epoch` optimiser steps."""
    return Schedule(
        eps=config.eps, total_steps=config.epochs * steps_per_epoch,
        warmup_steps=config.warmup_epochs * steps_per_epoch, ramp_steps=config.ramp_epochs * steps_per_epoch,
        kappa_end=config.kappa_end,
    )


def train_step(
    method: TrainingMethod, network: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
    schedule: Schedule, clock: int, grad_norm: float = 0.0, inputs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step of `method` on raw images x (or on already-mapped network `inputs`, for methods with a
    static input); returns the detached (loss, clean logits). Shared by `train_model` and `abscert_bench.api.train`."""
    if inputs is not None:
        loss, logits = method.loss_from_input(network, inputs, y)
    else:
        loss, logits = method.loss(network, x, y, schedule, clock)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_norm > 0:
        nn.utils.clip_grad_norm_(network.parameters(), grad_norm)
    optimizer.step()
    return loss.detach(), logits.detach()


def model_config_of(model: str, input_shape: list[int], num_classes: int, method: TrainingMethod,
                    activation: str = "relu") -> dict[str, Any]:
    """The model config a checkpoint stores (the network input has 2C channels when `method` has an abstraction)."""
    abstraction = method.abstraction()
    return {"model": model, "input_shape": list(input_shape), "num_classes": int(num_classes),
            "activation": activation, "abstraction": abstraction.to_dict() if abstraction else None,
            **method.model_options()}


def train_model(
    config: TrainConfig, method: TrainingMethod, train_x: torch.Tensor, train_y: torch.Tensor,
    test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int,
    on_epoch: Callable[[dict[str, Any]], None] | None = None, keep_best_epoch: bool = False,
    init: Callable[[nn.Module], None] | None = None,
) -> tuple[TrainedModel, list[dict[str, Any]]]:
    """Train one network with `method`; returns the model and per-epoch metrics (train time excludes eval).

    `test_x/test_y` is the evaluation split reported per epoch; with `keep_best_epoch` the returned network is
    the one of the epoch with the best accuracy on it (the official AbsCert selection when it is the test split).
    With `config.budget_s > 0` training runs for that many seconds of training time (evaluation excluded) and
    every schedule (eps ramp, kappa, lr) follows the elapsed fraction of the budget instead of the step count.
    """
    config.validate()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model_config = model_config_of(config.model, list(train_x.shape[1:]), num_classes, method, config.activation)
    network = build_network(model_config).to(device)
    if init is not None:
        init(network)
    trained = TrainedModel(network, model_config, method.abstraction())
    train_x, train_y = train_x.to(device), train_y.to(device)
    test_x, test_y = test_x.to(device), test_y.to(device)
    # a method whose network input depends on the image alone (AbsCert point) is mapped once, not every step
    train_inputs = method.network_input(train_x) if method.static_input else None
    steps_per_epoch = math.ceil(len(train_x) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    schedule = training_schedule(config, steps_per_epoch)
    method.prepare(network, method.network_input(train_x[:1]))
    optimizer = torch.optim.Adam(network.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    metrics: list[dict[str, Any]] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    step, spent, epoch = 0, 0.0, 0
    budget = config.budget_s
    while (epoch < config.epochs) if budget <= 0 else (spent < budget):
        epoch += 1
        network.train()
        order = torch.randperm(len(train_x), generator=generator).to(device)
        total_loss, correct, seen = 0.0, 0, 0
        start = time.perf_counter()
        clock = step
        for batch_start in range(0, len(train_x), config.batch_size):
            if budget > 0:
                elapsed = spent + time.perf_counter() - start
                if elapsed >= budget and seen:
                    break
                clock = min(total_steps - 1, int(elapsed / budget * total_steps))
            else:
                clock = step
            for group in optimizer.param_groups:
                group["lr"] = config.lr * config.lr_factor(clock / steps_per_epoch)
            idx = order[batch_start:batch_start + config.batch_size]
            y = train_y[idx]
            loss, logits = train_step(method, network, optimizer, train_x[idx], y, schedule, clock, config.grad_norm,
                                      None if train_inputs is None else train_inputs[idx])
            step += 1
            seen += len(idx)
            total_loss += float(loss) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_time = time.perf_counter() - start
        spent += train_time
        if not math.isfinite(total_loss):
            raise UserError(f"training diverged (loss is NaN) at epoch {epoch}; lower --lr")
        accuracy = evaluate(trained.classifier(), test_x, test_y)
        row = {
            "epoch": epoch, "eps": schedule.eps_at(clock) if method.uses_eps_schedule else "",
            "lr": optimizer.param_groups[0]["lr"], "loss": total_loss / max(1, seen),
            "train_acc": correct / max(1, seen), "test_acc": accuracy,
            "train_time_s": train_time, "images": seen,
        }
        metrics.append(row)
        if keep_best_epoch and (best is None or accuracy > best[0]):
            best = (accuracy, {k: v.detach().clone() for k, v in network.state_dict().items()})
        if on_epoch is not None:
            on_epoch(row)
    if best is not None:
        network.load_state_dict(best[1])
    network.eval()
    return trained.to("cpu"), metrics


def granularity_search(
    config: TrainConfig, dataset: Dataset, grid: list[float], validation_fraction: float = 0.1,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """The paper's search: train AbsCert for each d >= 2·eps on a split of train, pick the best paper-check accuracy.

    Methods other than `abscert` itself (abscert-adv, abscert-ibp, …: they train for the sound certificate) are
    selected instead by `abscert-sound` verified accuracy on the first SOUND_SELECTION_SAMPLES validation images
    (SOUND_SELECTION_TIMEOUT s each; ties: the paper check, then the coarser d)."""
    too_fine = [d for d in grid if d < 2 * config.eps - 1e-12]
    if too_fine:
        raise UserError(f"granularity search needs every d >= 2*eps = {2 * config.eps}; got {too_fine}")
    n_val = max(1, int(len(dataset.train_x) * validation_fraction))
    order = torch.randperm(len(dataset.train_x), generator=torch.Generator().manual_seed(config.seed))
    val_idx, fit_idx = order[:n_val], order[n_val:]
    rows = []
    for d in grid:
        options = {**config.method_options, "d": d}
        method = create_method(config.method, config.eps, **options)
        trained, _ = train_model(
            config, method, dataset.train_x[fit_idx], dataset.train_y[fit_idx],
            dataset.train_x[val_idx], dataset.train_y[val_idx], dataset.num_classes, on_epoch,
        )
        accuracy = evaluate(trained.classifier(), dataset.train_x[val_idx], dataset.train_y[val_idx])
        row = {"d": d, "validation_paper_accuracy": accuracy}
        if config.method != "abscert":
            row["validation_sound_accuracy"] = sound_accuracy(
                trained, dataset.train_x[val_idx[:SOUND_SELECTION_SAMPLES]],
                dataset.train_y[val_idx[:SOUND_SELECTION_SAMPLES]], config.eps)
        rows.append(row)
    best = max(rows, key=lambda r: (r.get("validation_sound_accuracy", 0.0), r["validation_paper_accuracy"], r["d"]))
    return float(best["d"]), rows


SOUND_SELECTION_SAMPLES, SOUND_SELECTION_TIMEOUT = 100, 0.5


def sound_accuracy(trained: TrainedModel, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    """Share of the images `abscert-sound` verifies (SOUND_SELECTION_TIMEOUT s each; unknown counts as not)."""
    from ..verification import create_verifier

    verifier = create_verifier("abscert-sound", timeout=SOUND_SELECTION_TIMEOUT)
    results = verifier.verify(trained, x.cpu(), y.cpu(), eps)
    return sum(r.status == "verified" for r in results) / max(1, len(results))


def xavier_init(network: nn.Module) -> None:
    """The official init (train/train.py `init_weights`): xavier_uniform_ on every Linear and Conv2d weight."""
    for module in network.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(module.weight)


def protocol_config(config: TrainConfig, recipe: dict[str, Any]) -> TrainConfig:
    """The TrainConfig a recipe row trains with ('given' rows leave the config as it is)."""
    if recipe["row"] == "given":
        return config
    return replace(config, epochs=int(recipe["epochs"]), batch_size=int(recipe["batch_size"]), lr=float(recipe["lr"]),
                   lr_schedule="cosine", lr_warmup_epochs=float(recipe["lr_warmup_epochs"]), lr_milestones=[],
                   lr_cycles=float(recipe["lr_cycles"]))


def official_search(
    config: TrainConfig, dataset: Dataset, on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """AbsCert as published (protocol 'official') or with honest selection ('clean').

    One model per official candidate (distinct cell count K, pixel d = 1/K), each trained with the recipe;
    the epoch with the best selection accuracy is kept, then the candidate with the best one (ties: the
    coarser). official: selection on the test split, as `train/train.py` and `main.py` do; clean: on a held-out,
    seeded `VALIDATION_FRACTION` of the training split, the models trained on the rest. The selection accuracy
    is the paper check on clean images, i.e. the accuracy of N(phi(x)). Returns the chosen model and records.
    """
    options = dict(config.method_options)
    protocol = check_protocol(options.get("protocol", "pixel"))
    if protocol not in SELECTION:
        raise UserError(f"official_search needs protocol official or clean, got {protocol}")
    if "d" in options:
        raise UserError(f"abscert protocol {protocol} chooses d itself from the official candidates; drop d")
    probe = create_method(config.method, config.eps, **options)  # validates the options
    recipe = recipe_for(config.dataset, config.model) if probe.options["recipe"] == "official" \
        else given_recipe(config.epochs)
    train_config = protocol_config(config, recipe)
    candidates = official_candidates(config.eps, probe.options["d_step"])
    if protocol == "clean":
        n_val = max(1, int(len(dataset.train_x) * VALIDATION_FRACTION))
        order = torch.randperm(len(dataset.train_x), generator=torch.Generator().manual_seed(config.seed))
        val_idx, fit_idx = order[:n_val], order[n_val:]
        fit = (dataset.train_x[fit_idx], dataset.train_y[fit_idx])
        select = (dataset.train_x[val_idx], dataset.train_y[val_idx])
    else:
        fit, select = (dataset.train_x, dataset.train_y), (dataset.test_x, dataset.test_y)
    device = resolve_device(config.device)
    test_x, test_y = dataset.test_x.to(device), dataset.test_y.to(device)
    rows: list[dict[str, Any]] = []
    all_metrics: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for candidate in candidates:
        method = create_method(config.method, config.eps, **{**options, "d": candidate.pixel_d})
        assert isinstance(method, AbsCertMethod)  # the official / clean protocols are AbsCert's
        method.configure(recipe, dataset.input_shape[0])
        held: dict[str, nn.Module] = {}

        def init(network: nn.Module, held=held) -> None:
            xavier_init(network)
            held["network"] = network

        def hook(row: dict[str, Any], method=method, held=held, candidate=candidate) -> None:
            if protocol == "clean":  # the loop's eval split is validation here: report test accuracy beside it
                row["val_acc"] = row["test_acc"]
                row["test_acc"] = evaluate(TrainedModel(held["network"], {}, method.abstraction()).classifier(),
                                           test_x, test_y)
            row["cells"] = candidate.cells
            if on_epoch is not None:
                on_epoch(row)

        trained, metrics = train_model(train_config, method, fit[0], fit[1], select[0], select[1],
                                       dataset.num_classes, hook, keep_best_epoch=True, init=init)
        key = "val_acc" if protocol == "clean" else "test_acc"
        accuracies = [float(m[key]) for m in metrics]
        best_index = accuracies.index(max(accuracies))  # the loop keeps the first epoch with the best accuracy
        row = {"paper_d": candidate.paper_d[0], "paper_d_all": ";".join(f"{d:.6g}" for d in candidate.paper_d),
               "cells": candidate.cells, "pixel_d": candidate.pixel_d, "paper_cell_width": candidate.cell_width_paper,
               "best_epoch": best_index + 1, "selection": SELECTION[protocol],
               "selection_accuracy": accuracies[best_index], "test_acc": float(metrics[best_index]["test_acc"]),
               "chosen": 0}
        rows.append(row)
        all_metrics += [{"cells": candidate.cells, **m} for m in metrics]
        if best is None or row["selection_accuracy"] > best["row"]["selection_accuracy"]:
            best = {"row": row, "trained": trained, "method": method, "metrics": metrics, "best_index": best_index}
    assert best is not None
    best["row"]["chosen"] = 1
    for i, m in enumerate(best["metrics"]):
        m["selected"] = int(i == best["best_index"])
    return {"protocol": protocol, "selection": SELECTION[protocol], "recipe": recipe, "config": train_config,
            "rows": rows, "all_metrics": all_metrics, **best}


def run_training(
    config: TrainConfig, dataset: Dataset, run_dir: Path, on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainedModel:
    """Train (with the granularity search when AbsCert gets several d) and write the run directory."""
    config.validate()
    options = dict(config.method_options)
    if config.method == "abscert" and options.get("protocol", "pixel") != "pixel":
        return _run_protocol(config, dataset, run_dir, on_epoch)
    search_rows: list[dict[str, Any]] = []
    grid = _as_list(options.get("d", []))
    if len(grid) > 1:
        best_d, search_rows = granularity_search(config, dataset, [float(d) for d in grid], on_epoch=on_epoch)
        options["d"] = best_d
    elif grid:
        options["d"] = float(grid[0])
    method = create_method(config.method, config.eps, **options)
    final_config = TrainConfig(**{**asdict(config), "method_options": options})
    write_json(run_dir / "config.json", {**asdict(final_config), "method": method.describe()["name"],
                                         "input_shape": list(dataset.input_shape),
                                         "num_classes": dataset.num_classes})
    if search_rows:
        write_csv(run_dir / "granularity_search.csv", search_rows)
    trained, metrics = train_model(final_config, method, dataset.train_x, dataset.train_y,
                                   dataset.test_x, dataset.test_y, dataset.num_classes, on_epoch)
    trained.extra = {"dataset": config.dataset, "method": method.describe(), "eps": config.eps}
    write_csv(run_dir / "metrics.csv", metrics)
    save_checkpoint(trained, run_dir / "checkpoint.pt")
    return trained


def _run_protocol(config: TrainConfig, dataset: Dataset, run_dir: Path,
                  on_epoch: Callable[[dict[str, Any]], None] | None) -> TrainedModel:
    """The official / clean protocol: search, then the run directory of the chosen candidate (no retraining)."""
    search = official_search(config, dataset, on_epoch)
    method, row = search["method"], search["row"]
    final_config = replace(search["config"], method_options={**config.method_options, "d": row["pixel_d"]})
    record = {"protocol": search["protocol"], "selection": search["selection"], "paper_eps": paper_eps(config.eps),
              "paper_d": row["paper_d"], "cells": row["cells"], "best_epoch": row["best_epoch"],
              "recipe": search["recipe"]}
    write_json(run_dir / "config.json", {**asdict(final_config), "method": method.describe()["name"],
                                         "input_shape": list(dataset.input_shape),
                                         "num_classes": dataset.num_classes, **record})
    write_csv(run_dir / "granularity_search.csv", search["rows"])
    write_csv(run_dir / "granularity_search_epochs.csv", search["all_metrics"])
    trained = search["trained"]
    trained.extra = {"dataset": config.dataset, "method": method.describe(), "eps": config.eps,
                     **{k: v for k, v in record.items() if k != "recipe"}}
    write_csv(run_dir / "metrics.csv", search["metrics"])
    save_checkpoint(trained, run_dir / "checkpoint.pt")
    return trained
