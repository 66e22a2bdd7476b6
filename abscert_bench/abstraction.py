"""The AbsCert abstraction: one definition of cells and phi, used by training, verification and export.

Pixels live in raw [0, 1]. Granularity `d` splits [0, 1] into cells C_k = [k·d, (k+1)·d),
k = 0 … K-1 with K = ceil(1/d); the last cell is closed and clipped at 1.

The cell rule (`cell_index`) is the only place a pixel is assigned to a cell. It computes
`floor(v / d + EDGE_TOLERANCE)` in float64 and clamps to [0, K-1]. The tolerance (2^-16 of a cell)
absorbs float rounding so that values that are exactly on an edge in decimal — 8-bit pixels such as
51/255 = 0.2 with d = 0.2 — land in the upper cell as the definition says, while no 8-bit level that is
off an edge (by at least 1/(255·100·d) cells for two-decimal d) is moved. Any monotone rule is sound for
verification as long as every component uses this one; torch, numpy and the ONNX export all do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError

EDGE_TOLERANCE = 2.0**-16
VARIANTS = ("point", "region")


def check_granularity(d: float) -> float:
    """Validate a granularity d ∈ (0, 1]; return it as float."""
    d = float(d)
    if not math.isfinite(d) or d <= 0 or d > 1:
        raise UserError(f"granularity d must be in (0, 1], got {d}")
    cells = round(1.0 / d)
    if 1e-9 < abs(1.0 / d - cells) <= EDGE_TOLERANCE:  # near 1/K on either side: a sliver or an overhanging cell
        why = ("its last cell would be narrower than the tolerance" if 1.0 / d > cells
               else f"cell edge {cells}·d would overhang 1 by less than the tolerance")
        raise UserError(f"granularity d = {d} is within the edge tolerance of, but not equal to, 1/{cells} ({why}); "
                        f"use d = 1/{cells} exactly or a d further from it")
    return d


def check_eps(eps: float) -> float:
    """Validate a perturbation radius eps ∈ [0, 1]; return it as float."""
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0 or eps > 1:
        raise UserError(f"eps must be in [0, 1], got {eps}")
    return eps


def num_cells(d: float) -> int:
    """K = ceil(1/d), computed with the same edge tolerance as the cell rule."""
    d = check_granularity(d)
    return max(1, math.ceil(1.0 / d - EDGE_TOLERANCE))


def cell_index(values: torch.Tensor | np.ndarray, d: float):
    """Index of the cell holding each value (torch or numpy in, same type out, int64)."""
    last = num_cells(d) - 1
    if isinstance(values, torch.Tensor):
        scaled = values.to(torch.float64) / d + EDGE_TOLERANCE
        return torch.floor(scaled).clamp_(0, last).to(torch.int64)
    scaled_array = np.asarray(values, dtype=np.float64) / d + EDGE_TOLERANCE
    return np.clip(np.floor(scaled_array), 0, last).astype(np.int64)


def cell_lower(index, d: float):
    """Lower end k·d of cell k (float32 tensor/array)."""
    if isinstance(index, torch.Tensor):
        return (index.to(torch.float64) * d).to(torch.float32)
    return (np.asarray(index, dtype=np.float64) * d).astype(np.float32)


def cell_upper(index, d: float):
    """Upper end min((k+1)·d, 1) of cell k (float32 tensor/array)."""
    if isinstance(index, torch.Tensor):
        return ((index.to(torch.float64) + 1) * d).clamp(max=1.0).to(torch.float32)
    return np.minimum((np.asarray(index, dtype=np.float64) + 1) * d, 1.0).astype(np.float32)


def phi(x: torch.Tensor, d: float) -> torch.Tensor:
    """Point abstraction: N×C×H×W image → N×2C×H×W [cell lower ends, cell upper ends]."""
    k = cell_index(x, d)
    return torch.cat([cell_lower(k, d), cell_upper(k, d)], dim=1).to(x.device)


def phi_numpy(x: np.ndarray, d: float) -> np.ndarray:
    """numpy twin of `phi` (same cell rule), for export checks and independent re-checks."""
    k = cell_index(x, d)
    return np.concatenate([cell_lower(k, d), cell_upper(k, d)], axis=1)


def ball(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L∞ ball [x-eps, x+eps] clipped to [0, 1]."""
    return (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)


def region_phi(x: torch.Tensor, d: float, eps: float) -> torch.Tensor:
    """Region abstraction: the union of the cells met by [x-eps, x+eps] ∩ [0,1], as [lower, upper] ends."""
    lo, hi = ball(x, eps)
    return torch.cat([cell_lower(cell_index(lo, d), d), cell_upper(cell_index(hi, d), d)], dim=1).to(x.device)


def reachable_cells(x: torch.Tensor, d: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel, the first and last index of the cells any x' in the clipped eps-ball can land in."""
    lo, hi = ball(x, eps)
    return cell_index(lo, d), cell_index(hi, d)


@dataclass(frozen=True)
class Abstraction:
    """A deployed input abstraction: variant ('point' or 'region'), granularity d, and training eps."""

    variant: str
    d: float
    eps: float = 0.0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise UserError(f"unknown abstraction variant {self.variant!r}; valid: {', '.join(VARIANTS)}")
        check_granularity(self.d)
        check_eps(self.eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Map images to abstract inputs (2C channels)."""
        if self.variant == "point":
            return phi(x, self.d)
        return region_phi(x, self.d, self.eps)

    def cells(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the cell each pixel of x falls in (the cell rule `cell_index`; int64, same shape as x)."""
        return cell_index(x, self.d)

    def preimage(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse cell view of point abstract inputs z (N×2C×H×W): per pixel the cell [lower, upper] of raw
        values that phi maps to z, i.e. phi(x) == z exactly for the x with lower <= x < upper (<= 1 in the last,
        closed cell; `cell_index` decides values on an edge). The region variant's inverse is not a cell."""
        if self.variant != "point":
            raise UserError("preimage is defined for the point abstraction (the region form depends on eps)")
        channels = z.shape[1] // 2
        return z[:, :channels], z[:, channels:]

    def reachable(self, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per pixel, the first and last cell that any x' of the [0,1]-clipped eps-ball around x can fall in.
        (The exact reachable abstract inputs, float32 rounding included, are `sound.reachable_options`.)"""
        return reachable_cells(x, self.d, check_eps(eps))

    def reachable_box(self, x: torch.Tensor, eps: float, form: str = "ends") -> tuple[torch.Tensor, torch.Tensor]:
        """Box (lower, upper) of the abstract inputs reachable from the [0,1]-clipped eps-ball around x.

        Both ends of the abstract pair are non-decreasing in the pixel value, so the box is spanned by the
        abstractions of the ball's two corners. `form`: 'ends' — the box of [L, U] (2C channels); 'lower' — the
        lower ends L only (C channels: for the point variant U is a function of L); 'gap' — the box of [L, U - L]
        (the gap form `abscert-sound` bounds: a pixel's gap is d in every cell but a clipped last one, so it spans
        the gaps at the two corners). Float32 rounding at cell edges is not widened here (the exact sweep of the
        verifier is `sound.reachable_options`)."""
        lo, hi = ball(x, check_eps(eps))
        a_lo, a_hi = self(lo), self(hi)
        channels = x.shape[1]
        if form == "ends":
            return a_lo, a_hi
        if form == "lower":
            return a_lo[:, :channels], a_hi[:, :channels]
        if form != "gap":
            raise ValueError(f"unknown box form {form!r}")
        gap_lo, gap_hi = a_lo[:, channels:] - a_lo[:, :channels], a_hi[:, channels:] - a_hi[:, :channels]
        return (torch.cat([a_lo[:, :channels], torch.minimum(gap_lo, gap_hi)], 1),
                torch.cat([a_hi[:, :channels], torch.maximum(gap_lo, gap_hi)], 1))

    def to_dict(self) -> dict:
        """JSON-able description."""
        return {"variant": self.variant, "d": self.d, "eps": self.eps}
