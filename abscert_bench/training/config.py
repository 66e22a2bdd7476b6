"""The training configuration: one dataclass, the single source of every training default.

Torch-free on purpose: the spec checker and the CLI validate settings from it before torch is imported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import UserError

LR_SCHEDULES = ("constant", "step", "cosine")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored as the run's config.json)."""

    dataset: str
    model: str
    method: str
    eps: float
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    activation: str = "relu"
    warmup_epochs: int = 1
    ramp_epochs: int = 5
    kappa_end: float = 0.5
    method_options: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    grad_norm: float = 0.0  # clip the gradient's global L2 norm to this before each step (0 = no clipping)
    lr_schedule: str = "constant"  # constant | step (× lr_decay after each of lr_milestones) | cosine
    lr_milestones: list[int] = field(default_factory=list)  # epochs after which `step` multiplies lr by lr_decay
    lr_decay: float = 0.2
    lr_warmup_epochs: float = 0.0  # linear lr warm-up from 0 (cosine and step), in epochs
    lr_cycles: float = 0.5  # cosine periods after warm-up (0.5: one half-cosine down to 0; official AbsCert code: 2)
    budget_s: float = 0.0  # > 0: train for this many seconds of training time; schedules are stretched to it

    def validate(self) -> None:
        """Raise UserError on out-of-range values (torch-free; the device is checked where torch is loaded)."""
        from ..abstraction import check_eps, check_granularity

        check_eps(self.eps)
        if self.epochs < 1 or self.batch_size < 1 or not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError("epochs and batch size must be >= 1 and lr > 0")
        if not (self.grad_norm >= 0 and math.isfinite(self.grad_norm)):
            raise UserError(f"grad_norm must be >= 0 (0 = no clipping), got {self.grad_norm}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"unknown lr schedule {self.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
        if any(not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in self.lr_milestones):
            raise UserError(f"lr_milestones must be epochs >= 1, got {self.lr_milestones}")
        if not (0 < self.lr_decay <= 1):
            raise UserError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if not (0 <= self.lr_warmup_epochs < self.epochs):
            raise UserError(f"lr_warmup_epochs must be in [0, epochs), got {self.lr_warmup_epochs}")
        if not (self.lr_cycles > 0 and math.isfinite(self.lr_cycles)):
            raise UserError(f"lr_cycles must be > 0, got {self.lr_cycles}")
        if not (self.budget_s >= 0 and math.isfinite(self.budget_s)):
            raise UserError(f"budget_s must be >= 0 seconds (0 = train for `epochs`), got {self.budget_s}")
        if not (0 <= self.kappa_end <= 1):
            raise UserError(f"kappa_end must be in [0, 1], got {self.kappa_end}")
        if "d" in self.method_options:
            for d in _as_list(self.method_options["d"]):
                check_granularity(d)

    def lr_factor(self, progress: float) -> float:
        """Multiplier of `lr` at training progress `progress` (in epochs, fractional)."""
        factor = 1.0
        if self.lr_warmup_epochs > 0 and progress < self.lr_warmup_epochs:
            factor = progress / self.lr_warmup_epochs
        if self.lr_schedule == "step":
            factor *= self.lr_decay ** sum(1 for m in self.lr_milestones if progress >= m)
        elif self.lr_schedule == "cosine" and progress >= self.lr_warmup_epochs:
            span = max(1e-12, self.epochs - self.lr_warmup_epochs)
            t = min(1.0, (progress - self.lr_warmup_epochs) / span)
            factor *= max(0.0, 0.5 * (1 + math.cos(2 * math.pi * self.lr_cycles * t)))
        return factor


# The fields a spec's [train] table (and the CLI) may set: every field but what the grid or the method decides.
RUN_FIELDS = ("dataset", "model", "method", "eps", "seed", "method_options")
TRAIN_FIELD_DEFAULTS: dict[str, Any] = {
    f.name: (f.default_factory() if callable(f.default_factory) else f.default)  # type: ignore[misc]
    for f in fields(TrainConfig) if f.name not in RUN_FIELDS
}


def field_default(name: str) -> Any:
    """TrainConfig's default for field `name` (the run fields too, e.g. seed)."""
    f = {f.name: f for f in fields(TrainConfig)}[name]
    return f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]


def config_from_settings(settings: dict[str, Any], **run: Any) -> TrainConfig:
    """TrainConfig from a [train]-style mapping (unknown keys ignored) plus the run fields."""
    known = {k: v for k, v in settings.items() if k in TRAIN_FIELD_DEFAULTS}
    return TrainConfig(**run, **known)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]
