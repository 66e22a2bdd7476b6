"""A trained model as the rest of the tool sees it: network N, optional abstraction, and its config."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .abstraction import Abstraction
from .errors import UserError
from .models import DeployedClassifier, create_model

CHECKPOINT_FORMAT = "abscert-bench/1"


@dataclass
class TrainedModel:
    """The network N, the abstraction in front of it (None for standard models) and how it was built."""

    network: nn.Module
    model_config: dict[str, Any]
    abstraction: Abstraction | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of the raw images the deployed classifier takes."""
        return tuple(self.model_config["input_shape"])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        return int(self.model_config["num_classes"])

    def classifier(self) -> nn.Module:
        """The deployed classifier on raw images: N(abstraction(x)) or N itself."""
        if self.abstraction is None:
            return self.network
        return DeployedClassifier(self.abstraction, self.network)

    def to(self, device: str | torch.device) -> TrainedModel:
        """Move the network to `device` (in place) and return self."""
        self.network.to(device)
        return self


def build_network(model_config: dict[str, Any]) -> nn.Module:
    """Instantiate N from a model config (the network input has 2C channels for abstraction models)."""
    channels, height, width = model_config["input_shape"]
    if model_config.get("abstraction"):
        channels *= 2
    return create_model(
        model_config["model"], (channels, height, width), model_config["num_classes"],
        activation=model_config.get("activation", "relu"), normalize=model_config.get("normalize"),
    )


def save_checkpoint(trained: TrainedModel, path: Path) -> None:
    """Write state dict + config atomically (temp file, then rename)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": trained.model_config,
        "state_dict": {k: v.detach().cpu() for k, v in trained.network.state_dict().items()},
        "extra": trained.extra,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, device: str = "cpu") -> TrainedModel:
    """Reload a checkpoint; corrupt files, foreign formats and NaN weights raise a one-line UserError."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        if path.with_name(path.name + ".omitted.json").exists():
            raise UserError(f"the checkpoint {path} was left out of this results store to keep it small "
                            f"(see {path.name}.omitted.json); rerun the cell to recreate it")
        raise UserError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise UserError(f"corrupt checkpoint {path}: {type(exc).__name__}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not an abscert-bench checkpoint")
    config = payload["model_config"]
    for name, tensor in payload["state_dict"].items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"checkpoint {path} has NaN/inf values in {name}")
    network = build_network(config)
    try:
        network.load_state_dict(payload["state_dict"])
    except RuntimeError:
        raise UserError(f"checkpoint {path} does not match architecture {config['model']}") from None
    network.eval()
    abstraction = Abstraction(**config["abstraction"]) if config.get("abstraction") else None
    return TrainedModel(network.to(device), config, abstraction, payload.get("extra", {}))


def check_input_shape(trained: TrainedModel, input_shape: tuple[int, ...], dataset: str) -> None:
    """Refuse a model whose input shape differs from the dataset's."""
    if tuple(trained.input_shape) != tuple(input_shape):
        raise UserError(
            f"model expects inputs of shape {tuple(trained.input_shape)}, dataset {dataset} has {tuple(input_shape)}"
        )

