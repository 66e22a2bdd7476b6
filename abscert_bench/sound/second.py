"""CROWN bounds on the second convolution's neurons of a Conv → ReLU → Conv → ReLU network, in one matrix product.

A branch-and-bound refresh recomputes every ReLU input's bounds of a child domain. On AbsCert DM_Small (MNIST,
pixel eps 0.1, d 0.2) the second convolution has ~450–780 unstable neurons per domain, and auto_LiRPA bounds them
by CROWN through patches that it unfolds back to the input — ~5 ms a domain, most of a refresh, for a few
thousand multiply-adds a neuron. Their bounds are what the refresh is for: with them kept from the parent, refreshes
verified 36 of 2,694 children in 10 s on one of the benchmark's unknown images, against 513 of 1,272 recomputed.

A second-layer neuron i depends on a k2×k2 window of the first ReLU layer, which depends on an A×A window of the
input. With the first ReLU's input bounds [l1, u1] exact over the box (the first layer is affine) and CROWN's
relaxation of it (`forward.relaxation`: lower slope α, upper slope s and intercept β), the lower bound of z2_i is

    b2_i + Σ_j W⁻_ij β_j + Σ_j D_ij z1_j(centre) − Σ_p |(D_i K)_p| · radius_p,     D_ij = W⁺_ij α_j + W⁻_ij s_j,

(the upper bound with the roles of the two relaxations swapped), where K is the first convolution transposed on
one window (the same for every window: zero padding of either convolution only zeroes terms), so the whole layer
is a gather of windows, elementwise products and one product with K (the constants of all neurons: convolutions of
the relaxed centre). That is exactly CROWN's bound for these neurons given the same [l1, u1] (tested against a float64
dense CROWN; never looser than auto_LiRPA's), and with `given` bounds (a branch-and-bound parent's)
only the neurons they leave unstable are bounded; the rest keep the given bounds, and the result is intersected
with them.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .forward import _affine, _layers, relaxation

Pair = tuple[int, int]
#: the second layer's rows are bounded this many MiB of temporaries at a time
CHUNK_MB = 128


def _geometry(layer: nn.Module) -> tuple[Pair, Pair, Pair] | None:
    """(kernel, stride, padding) of a plain convolution (one group, no dilation, zero padding by numbers), else None."""
    if not (isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str) and tuple(layer.dilation) == (1, 1)):
        return None
    kernel, stride, padding = (tuple(int(v) for v in values) for values in
                               (layer.kernel_size, layer.stride, layer.padding))
    return (kernel[0], kernel[1]), (stride[0], stride[1]), (padding[0], padding[1])


class SecondLayerBounds:
    """Bounds on the inputs of the first two ReLU layers of Conv → ReLU → Conv → ReLU … (build with `of`)."""

    def __init__(self, first: nn.Conv2d, second: nn.Conv2d) -> None:
        self.first, self.second = first, second
        geometry1, geometry2 = _geometry(first), _geometry(second)
        assert geometry1 is not None and geometry2 is not None, "plain convolutions only (see `of`)"
        (k1h, k1w), self.stride1, self.padding1 = geometry1
        (kh, kw), self.stride2, self.padding2 = geometry2
        self.kernel2 = (kh, kw)
        c1 = first.out_channels
        basis = torch.eye(c1 * kh * kw, dtype=first.weight.dtype, device=first.weight.device).view(-1, c1, kh, kw)
        with torch.no_grad():  # the first convolution transposed on one window of the first ReLU layer
            self.kernel = F.conv_transpose2d(basis, first.weight, None, self.stride1).flatten(1)
        # the input window under one k2×k2 window of the first ReLU layer
        self.in_window = ((kh - 1) * self.stride1[0] + k1h, (kw - 1) * self.stride1[1] + k1w)
        affine = _affine(first)  # the first layer as the forward pass maps it (W·x + β, |W|·x)
        assert affine is not None
        self.affine1 = affine

    @classmethod
    def of(cls, module: nn.Module) -> SecondLayerBounds | None:
        """The helper for `module`, or None unless it starts Conv2d, ReLU, Conv2d, ReLU (plain convolutions)."""
        layers = _layers(module)
        if layers is None or len(layers) < 4:
            return None
        first, act1, second, act2 = layers[:4]
        if not (isinstance(first, nn.Conv2d) and isinstance(second, nn.Conv2d) and _geometry(first) is not None
                and _geometry(second) is not None and isinstance(act1, nn.ReLU) and isinstance(act2, nn.ReLU)):
            return None
        return cls(first, second)

    def first_bounds(self, x_lo: torch.Tensor, x_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first ReLU input at the box centre, and its exact bounds over the box (l1, u1)."""
        z1 = self.affine1.apply((x_hi + x_lo) / 2, True)
        spread = self.affine1.apply_abs((x_hi - x_lo) / 2)
        return z1, z1 - spread, z1 + spread

    @torch.no_grad()
    def bounds(
        self, x_lo: torch.Tensor, x_hi: torch.Tensor,
        given: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
        check: Callable[[float], None] | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(l1, u1), (l2, u2)]: bounds on both ReLU layers' inputs for n domains (input boxes n × C × H × W).

        `given[r]`: sound bounds already known for ReLU r's input (a parent's): the result is intersected with
        them, and with given bounds on the second layer only the neurons they leave unstable are bounded. `check(mb)`
        is called before each chunk of rows with an estimate of the memory it will allocate (the time and memory
        limits of the bound call).
        """
        given = list(given or []) + [None, None]
        z1, l1, u1 = self.first_bounds(x_lo, x_hi)
        if given[0] is not None:
            l1, u1 = torch.maximum(l1, given[0][0]), torch.minimum(u1, given[0][1])
            u1 = torch.maximum(u1, l1)
        conv = self.second
        n, c2 = len(x_lo), conv.out_channels
        h2, w2 = ((size + 2 * pad - kernel) // stride + 1 for size, pad, kernel, stride in
                  zip(l1.shape[2:], self.padding2, self.kernel2, self.stride2))
        if given[1] is not None:
            l2, u2 = (t.clone(memory_format=torch.contiguous_format) for t in given[1])
            rows = torch.nonzero(((l2 < 0) & (u2 > 0)).reshape(n, -1))
        else:
            l2 = torch.full((n, c2, h2, w2), -torch.inf, dtype=x_lo.dtype, device=x_lo.device)
            u2 = torch.full_like(l2, torch.inf)
            rows = torch.nonzero(torch.ones(n, c2 * h2 * w2, dtype=torch.bool, device=x_lo.device))
        if len(rows):
            lower, upper = self._rows(x_lo, x_hi, z1, l1, u1, rows, (h2, w2), check)
            flat_l2, flat_u2 = l2.view(n, -1), u2.view(n, -1)
            at = (rows[:, 0], rows[:, 1])
            flat_l2[at] = torch.maximum(flat_l2[at], lower)
            flat_u2[at] = torch.maximum(torch.minimum(flat_u2[at], upper), flat_l2[at])
        return [(l1, u1), (l2, u2)]

    def _rows(self, x_lo, x_hi, z1, l1, u1, rows: torch.Tensor, out_hw: tuple[int, int],
              check: Callable[[float], None] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """CROWN bounds of the second-layer neurons `rows` ((domain, flat neuron) pairs), CHUNK_MB of rows at a time."""
        conv = self.second
        kh, kw = self.kernel2
        (sh, sw), (ph, pw) = self.stride2, self.padding2
        lo_slope, up_slope, up_shift = relaxation(l1, u1)
        # the constant part for every neuron at once: the second convolution of the relaxed centre, W⁺ taking one
        # relaxation and W⁻ the other (the upper bound: the reverse)
        w_pos, w_neg = conv.weight.clamp(min=0), conv.weight.clamp(max=0)
        low_part, high_part = lo_slope * z1, up_slope * z1 + up_shift
        consts = [(F.conv2d(pos_part, w_pos, conv.bias, self.stride2, self.padding2)
                   + F.conv2d(neg_part, w_neg, None, self.stride2, self.padding2)).flatten(1)
                  for pos_part, neg_part in ((low_part, high_part), (high_part, low_part))]
        # every second-layer neuron's k2×k2 window of the first layer's slopes, and its input window's radii: a
        # first-layer window starting at row y·s2 - p2 reads input rows from (y·s2 - p2)·s1 - p1, so the input is
        # padded until every such window lies inside
        alphas, slopes = (F.unfold(t, (kh, kw), padding=(ph, pw), stride=(sh, sw)) for t in (lo_slope, up_slope))
        (s1h, s1w), (p1h, p1w) = self.stride1, self.padding1
        top, left = ph * s1h + p1h, pw * s1w + p1w
        (ah, aw), (height, width) = self.in_window, x_lo.shape[2:]
        bottom = max(0, (out_hw[0] - 1) * sh * s1h + ah - height - top)
        right = max(0, (out_hw[1] - 1) * sw * s1w + aw - width - left)
        radii = F.unfold(F.pad((x_hi - x_lo) / 2, (left, right, top, bottom)), (ah, aw), stride=(sh * s1h, sw * s1w))
        weights = conv.weight.flatten(1)
        per_row = 4 * (8 * weights.shape[1] + 6 * self.kernel.shape[1])  # bytes of the temporaries one row needs
        lower, upper = [], []
        for part in rows.split(max(1, int(CHUNK_MB * 2**20 // per_row))):
            if check is not None:
                check(len(part) * per_row / 2**20)
            domain, neuron = part[:, 0], part[:, 1]
            position = neuron % (out_hw[0] * out_hw[1])
            weight = weights[neuron // (out_hw[0] * out_hw[1])]
            alpha, slope = alphas[domain, :, position], slopes[domain, :, position]
            positive = weight > 0
            chosen = torch.cat([torch.where(positive, alpha, slope), torch.where(positive, slope, alpha)])
            coefficients = (chosen * weight.repeat(2, 1)) @ self.kernel  # the rows' linear bounds on the input window
            spread = (coefficients.abs() * radii[domain, :, position].repeat(2, 1)).sum(1)
            lower.append(consts[0][domain, neuron] - spread[:len(part)])
            upper.append(consts[1][domain, neuron] + spread[len(part):])
        return torch.cat(lower), torch.cat(upper)
