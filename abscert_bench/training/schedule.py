"""The usual certified-training schedule: warm-up at eps = 0, linear eps ramp, kappa/beta mixing."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Epoch-level schedule; `fraction(step)` is how far the ramp has gone (0 → 1)."""

    eps: float
    total_steps: int
    warmup_steps: int = 0
    ramp_steps: int = 0
    kappa_start: float = 1.0
    kappa_end: float = 0.5
    beta_start: float = 1.0
    beta_end: float = 0.0

    def fraction(self, step: int) -> float:
        """0 during warm-up, rising linearly to 1 over the ramp, 1 afterwards."""
        if step < self.warmup_steps:
            return 0.0
        if self.ramp_steps <= 0:
            return 1.0
        return min(1.0, (step - self.warmup_steps + 1) / self.ramp_steps)

    def eps_at(self, step: int) -> float:
        """Training eps at optimiser step `step`."""
        return self.eps * self.fraction(step)

    def kappa_at(self, step: int) -> float:
        """Weight of the clean loss (1 - kappa goes to the worst-case loss)."""
        t = self.fraction(step)
        return self.kappa_start + (self.kappa_end - self.kappa_start) * t

    def beta_at(self, step: int) -> float:
        """CROWN-IBP weight of the CROWN-IBP bound against the pure IBP bound."""
        t = self.fraction(step)
        return self.beta_start + (self.beta_end - self.beta_start) * t
