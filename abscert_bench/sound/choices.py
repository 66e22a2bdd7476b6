"""The reachable abstract inputs of an eps-ball: per pixel, a short list of options.

An option is (abstract lower end, abstract upper end, a concrete pixel value producing it). The deployed
classifier maps each pixel value v to an abstract pair A(v) — `phi` for the point variant, the region form
for 'region' — and both ends of A(v) are non-decreasing in v. So as a pixel sweeps its ball interval the
pair changes only a few times; the options are the distinct pairs along that sweep, in sweep order, and
both ends are non-decreasing in the option index. A contiguous range of options therefore has a box hull
given by its first and last option, which is what the bounds and the branch and bound work with.

The options are found with the abstraction itself as the oracle (never a re-implementation of the cell
rule): bisection over the float32 values of the interval (non-negative float32 numbers are ordered like
their bit patterns) finds the first float32 value at which A changes. The result is exact for the
float32 pixels the deployed classifier actually receives.

Why the ball is widened by one float32 ulp on each side: the real endpoints x ± eps are in general not
float32 numbers. Rounding them to float32 may move an endpoint inward by up to half an ulp, and if a cell
edge (as `cell_index` places it, tolerance included) lies in that sliver, a reachable cell would be
dropped and a `verified` answer could be unsound. Widening by one ulp makes the swept interval a superset
of the float32 values in the real ball; any extra value lies at most 1.5 ulps (< 1e-7 for pixels in [0,1])
outside it, which the counterexample re-check tolerates. Concrete values are always chosen as close to
the clean pixel as the option allows, so the extra sliver is used only when nothing else produces it.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..abstraction import Abstraction, cell_index, reachable_cells

FLOAT32_BITS = 31  # bisection steps that resolve any interval of non-negative float32 values


@dataclass
class PixelOptions:
    """Options of every pixel of a batch: arrays of shape B×P×M (P pixels, M = most options of any pixel).

    Options past `count` repeat the last real option, so ranges [0, count-1] index valid entries only.
    """

    lower: np.ndarray      # float32, abstract lower end of each option
    upper: np.ndarray      # float32, abstract upper end of each option
    value: np.ndarray      # float32, a concrete pixel value (in the widened ball) producing the option
    count: np.ndarray      # int64 B×P, number of options per pixel
    clean: np.ndarray      # int64 B×P, the option the clean pixel falls in
    image_shape: tuple[int, int, int]

    @property
    def batch(self) -> int:
        """Number of images."""
        return int(self.count.shape[0])

    def choice_pixels(self, sample: int) -> np.ndarray:
        """Flat indices of the pixels of `sample` with two or more options."""
        return np.flatnonzero(self.count[sample] > 1)

    def combinations(self, sample: int) -> float:
        """Number of reachable abstract inputs of `sample` (product of option counts, as a float)."""
        return float(np.prod(self.count[sample].astype(np.float64)))

    def abstract(self, sample: int, choice: np.ndarray) -> np.ndarray:
        """Abstract input (2C×H×W) for one option index per pixel (`choice`: length P)."""
        rows = np.arange(self.count.shape[1])
        lower = self.lower[sample, rows, choice]
        upper = self.upper[sample, rows, choice]
        c, h, w = self.image_shape
        return np.concatenate([lower.reshape(c, h, w), upper.reshape(c, h, w)], axis=0)

    def concrete(self, sample: int, choice: np.ndarray) -> np.ndarray:
        """Concrete raw image (C×H×W) producing the abstract input of `choice`."""
        rows = np.arange(self.count.shape[1])
        return self.value[sample, rows, choice].reshape(self.image_shape)


def widened_ball(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """[x-eps, x+eps] ∩ [0,1], computed in float64, rounded to float32 and widened by one ulp outward."""
    x64 = np.asarray(x, dtype=np.float64)
    lo = np.nextafter(np.float32(np.clip(x64 - eps, 0.0, 1.0)).astype(np.float32), np.float32(-np.inf))
    hi = np.nextafter(np.float32(np.clip(x64 + eps, 0.0, 1.0)).astype(np.float32), np.float32(np.inf))
    return np.clip(lo, 0.0, 1.0).astype(np.float32), np.clip(hi, 0.0, 1.0).astype(np.float32)


@contextmanager
def single_thread():
    """Run small elementwise torch work on one thread (intra-op threads only add overhead there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _pixel_map(abstraction: Abstraction, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Abstract (lower, upper) of single pixel values, computed by the abstraction itself."""
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(1, 1, 1, -1)
    with torch.no_grad():
        pair = abstraction(tensor).view(2, -1).numpy()
    return pair[0].copy(), pair[1].copy()


def _as_float(bits: np.ndarray) -> np.ndarray:
    return bits.astype(np.int32).view(np.float32)


def _bits(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float32).view(np.int32).astype(np.int64)


def _runs(abstraction: Abstraction, lo: np.ndarray, hi: np.ndarray, centre: np.ndarray):
    """Per flat pixel, the runs of constant abstract value over the float32 values of [lo, hi].

    Returns lists (lower, upper, value) of 1-D arrays, one entry per run index, plus count and clean.
    """
    n = lo.size
    start = _bits(lo)
    last = _bits(hi)
    count = np.zeros(n, dtype=np.int64)
    clean = np.zeros(n, dtype=np.int64)
    centre_bits = _bits(centre)
    lowers: list[np.ndarray] = []
    uppers: list[np.ndarray] = []
    values: list[np.ndarray] = []
    active = np.arange(n)
    while active.size:
        s = start[active]
        a_low, a_up = _pixel_map(abstraction, _as_float(s))
        z_low, z_up = _pixel_map(abstraction, _as_float(last[active]))
        constant = (z_low == a_low) & (z_up == a_up)  # one run to the end: no bisection needed
        # Bisection: first bit pattern in (s, last] whose abstract value differs from A(s).
        left = np.where(constant, last[active], s)
        right = last[active] + 1
        for _ in range(FLOAT32_BITS + 1):
            open_ = np.flatnonzero(right - left > 1)
            if open_.size == 0:
                break
            mid = (left[open_] + right[open_]) // 2
            m_low, m_up = _pixel_map(abstraction, _as_float(mid))
            same = (m_low == a_low[open_]) & (m_up == a_up[open_])
            left[open_[same]] = mid[same]
            right[open_[~same]] = mid[~same]
        run_end = left
        # Concrete value: the float32 of the run closest to the clean pixel.
        value = _as_float(np.clip(centre_bits[active], s, run_end))
        k = len(lowers)
        full_low = np.full(n, np.nan, dtype=np.float32)
        full_up = np.full(n, np.nan, dtype=np.float32)
        full_val = np.full(n, np.nan, dtype=np.float32)
        full_low[active], full_up[active], full_val[active] = a_low, a_up, value
        lowers.append(full_low)
        uppers.append(full_up)
        values.append(full_val)
        count[active] += 1
        holds_centre = (centre_bits[active] >= s) & (centre_bits[active] <= run_end)
        clean[active[holds_centre]] = k
        more = run_end < last[active]
        start[active[more]] = run_end[more] + 1
        active = active[more]
    return lowers, uppers, values, count, clean


def reachable_options(abstraction: Abstraction, x: torch.Tensor, eps: float) -> PixelOptions:
    """Options of every pixel of the images x (B×C×H×W) under L∞ perturbations of radius eps."""
    x_np = x.detach().cpu().numpy().astype(np.float32)
    b, c, h, w = x_np.shape
    lo, hi = widened_ball(x_np, eps)
    with single_thread():
        lowers, uppers, values, count, clean = _runs(abstraction, lo.ravel(), hi.ravel(), x_np.ravel())
    m = len(lowers)
    stack = [np.stack(arrays, axis=1) for arrays in (lowers, uppers, values)]
    # Pad every pixel's options by repeating its last real option.
    last_index = (count - 1)[:, None]
    pad_index = np.minimum(np.arange(m)[None, :], last_index)
    rows = np.arange(count.size)[:, None]
    lower, upper, value = (s[rows, pad_index].reshape(b, c * h * w, m) for s in stack)
    options = PixelOptions(lower, upper, value, count.reshape(b, -1), clean.reshape(b, -1), (c, h, w))
    if abstraction.variant == "point":
        _check_point_cells(abstraction, x, eps, lo, hi, options)
    return options


def _check_point_cells(abstraction, x, eps, lo, hi, options: PixelOptions) -> None:
    """For the point variant the options must be exactly the cells cell(lo)..cell(hi) (widened ball),
    a superset of `reachable_cells` on the float32 ball; guards the sweep against any drift."""
    d = abstraction.d
    first = cell_index(lo.reshape(options.batch, -1), d)
    last = cell_index(hi.reshape(options.batch, -1), d)
    if not np.array_equal(last - first + 1, options.count):
        raise AssertionError("reachable options disagree with the cell rule")
    plain_first, plain_last = (t.reshape(options.batch, -1).numpy() for t in reachable_cells(x, d, eps))
    if (plain_first < first).any() or (plain_last > last).any():
        raise AssertionError("widened ball lost a reachable cell")
