"""Forward linear bounds on every ReLU input, over the input coordinates that can move.

The bounded module's input box (see `bounds.HullBounder.box`) has 2C×H×W coordinates, but on MNIST with
d >= 2·eps only ~70 of them have a width (the lower ends of the pixels with two reachable cells); every other
coordinate is a constant, or (the point variant's gap channel) an interval an ulp or two wide. A CROWN
backward pass for an intermediate layer pays for every neuron of that layer, whatever the input; a forward
pass pays for every input variable instead. So here each domain gets its own variables s ∈ [0, 1]^k, one per
coordinate j wider than `VARIABLE_WIDTH`, with x_j = lo_j + s·width_j (exact at both ends); the narrow
coordinates stay intervals, carried in the bias of the linear bounds. Each layer's pre-activation z then
has linear bounds  b_lo + A_lo·s <= z <= b_hi + A_hi·s,  propagated layer by layer:

- an affine layer W·z + β maps them to W⁺·lower + W⁻·upper (and the reverse for the upper bound), computed
  as W·centre ∓ |W|·radius with centre = (A_lo + A_hi)/2, radius = (A_hi − A_lo)/2 — two convolutions of the
  k coefficient maps, not four;
- a ReLU whose input bounds [l, u] (the linear bounds minimised / maximised over the box, intersected with
  any given bounds and with interval bounds) straddle 0 gets CROWN's relaxation: upper u/(u − l)·(z − l),
  lower α·z with α = 1 if u >= −l else 0; a stable ReLU passes or zeroes its bounds.

Every step is a sound over-approximation of the network on the box (the usual float32 arithmetic of linear
bound propagation, as in auto_LiRPA). The result is the bounds on every ReLU input, which `HullBounder`
hands to auto_LiRPA as intermediate bounds for one CROWN backward pass from the margins (which also gives the
linear bound branch and bound needs). Supported: nn.Sequential (nested, or `GapHullNetwork`) of Conv2d,
Linear, Flatten, ReLU, BatchNorm (eval) and Identity; anything else makes `ForwardBounds.of` return None.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input

#: coordinates at most this wide stay intervals (the gap channel's outward-rounded ~1e-8 boxes)
VARIABLE_WIDTH = 1e-6
#: back-substitution of a ReLU input's bounds goes back through at most this many earlier ReLU layers ...
BACK_DEPTH = 3
#: ... for layers of at most this many neurons (a wide convolution's back-substitution costs more than it wins)
BACK_NEURONS = 1024
#: ... while its Λ (neurons × features at the closing layer, per domain) has at most this many entries
BACK_ELEMENTS = 2**24


@dataclass
class Affine:
    """One affine layer: `apply(x, bias)` = W·x (+ β when bias), `apply_abs(x)` = |W|·x.

    `back(Λ, in_shape)` = Λ·W for m rows Λ (m × output shape → m × in_shape), for the backward pass.
    """

    apply: Callable[[torch.Tensor, bool], torch.Tensor]
    apply_abs: Callable[[torch.Tensor], torch.Tensor]
    back: Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]


def _affine(layer: nn.Module) -> Affine | None:
    if isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
        w, b = layer.weight, layer.bias
        stride, padding, dilation, groups = layer.stride, layer.padding, layer.dilation, layer.groups
        return Affine(lambda x, bias: F.conv2d(x, w, b if bias else None, stride, padding, dilation, groups),
                      lambda x: F.conv2d(x, w.abs(), None, stride, padding, dilation, groups),
                      lambda lam, shape: conv2d_input((len(lam), *shape), w, lam, stride, padding, dilation, groups))
    if isinstance(layer, nn.Linear):
        w, b = layer.weight, layer.bias
        return Affine(lambda x, bias: F.linear(x, w, b if bias else None), lambda x: F.linear(x, w.abs()),
                      lambda lam, shape: lam @ w)
    if isinstance(layer, nn.Flatten):
        return Affine(lambda x, bias: layer(x), layer, lambda lam, shape: lam.reshape(len(lam), *shape))
    if isinstance(layer, nn.Identity):
        return Affine(lambda x, bias: x, lambda x: x, lambda lam, shape: lam)
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) and not layer.training \
            and layer.running_mean is not None and layer.running_var is not None:
        scale = torch.rsqrt(layer.running_var + layer.eps)
        if layer.weight is not None:
            scale = scale * layer.weight
        shift = -layer.running_mean * scale + (layer.bias if layer.bias is not None else 0.0)

        def shaped(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return t.view(1, -1, *([1] * (x.dim() - 2)))

        return Affine(lambda x, bias: x * shaped(scale, x) + (shaped(shift, x) if bias else 0.0),
                      lambda x: x * shaped(scale.abs(), x), lambda lam, shape: lam * shaped(scale, lam))
    return None


def _layers(module: nn.Module) -> list[nn.Module] | None:
    """The module as a flat list of primitive layers, or None if it is not a plain chain."""
    from .bounds import GapHullNetwork

    if isinstance(module, GapHullNetwork):
        rest = _layers(module.network)
        return None if rest is None else [module.premap, *rest]
    if isinstance(module, nn.Sequential):
        flat: list[nn.Module] = []
        for child in module:
            inner = _layers(child)
            if inner is None:
                return None
            flat += inner
        return flat
    return [module]


class ForwardBounds:
    """Forward linear bounds through one chain network (build with `of`)."""

    def __init__(self, steps: list[Affine | None]) -> None:
        self.steps = steps  # an Affine, or None for a ReLU
        self.relus = sum(step is None for step in steps)

    @classmethod
    def of(cls, module: nn.Module) -> ForwardBounds | None:
        layers = _layers(module)
        if layers is None:
            return None
        steps: list[Affine | None] = []
        for layer in layers:
            if isinstance(layer, nn.ReLU):
                steps.append(None)
                continue
            affine = _affine(layer)
            if affine is None:
                return None
            steps.append(affine)
        return cls(steps)

    @staticmethod
    def variables(x_lo: torch.Tensor, x_hi: torch.Tensor) -> int:
        """The most input variables any of the n domains of this box has."""
        return int(((x_hi - x_lo).flatten(1) > VARIABLE_WIDTH).sum(1).max()) if len(x_lo) else 0

    def relu_inputs(
        self, x_lo: torch.Tensor, x_hi: torch.Tensor, given: list[tuple[torch.Tensor, torch.Tensor] | None],
        upto: int | None = None, check: Callable[[float], None] | None = None, depth: int = BACK_DEPTH,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Bounds (l, u) on the input of each of the first `upto` ReLUs (all by default) for n domains.

        Each ReLU input's bounds are the forward ones, intersected with interval bounds and, where its Λ fits
        (BACK_ELEMENTS), with a CROWN back-substitution through the last `depth` ReLU layers before it, closed
        at the pre-activation there with that layer's forward linear bounds (Λ⁺·lower + Λ⁻·upper: a product
        with the k coefficient maps). The back-substitution chooses each earlier ReLU's relaxation per output
        neuron, which forward bounds cannot, and costs (neurons × features × k), not a backward pass to the
        input.

        `given[r]`: sound bounds already known for ReLU r's input (or None); the result is intersected with
        them. `check(mb)` is called before each layer with an estimate of the memory it will allocate.
        """
        upto = self.relus if upto is None else upto
        n = len(x_lo)
        width = (x_hi - x_lo).flatten(1)
        wide = width > VARIABLE_WIDTH
        k = max(1, self.variables(x_lo, x_hi))
        # variable j of domain i is its j-th wide coordinate (padding variables have no coefficient)
        rank = torch.cumsum(wide.to(torch.int64), 1) - 1
        rows, coords = torch.nonzero(wide, as_tuple=True)
        a_lo = torch.zeros(n, k, width.shape[1], dtype=x_lo.dtype, device=x_lo.device)
        a_lo[rows, rank[rows, coords], coords] = width[rows, coords]
        a_lo = a_hi = a_lo.view(n * k, *x_lo.shape[1:])  # A_lo = A_hi until the first unstable ReLU
        b_lo, b_hi = x_lo, torch.where(wide.view_as(x_lo), x_lo, x_hi)  # a variable's bias is its lower end
        ibp_lo, ibp_hi = x_lo, x_hi
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        shapes: list[tuple[int, ...]] = []  # each step's input shape
        states: dict[int, tuple[torch.Tensor, ...]] = {}  # ReLU step: (A_lo, A_hi, b_lo, b_hi) of its input
        bounds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # ReLU step: its input bounds
        for index, step in enumerate(self.steps):
            if len(out) == upto:
                break
            shapes.append(tuple(b_lo.shape[1:]))
            if check is not None:
                check(4 * 2 * a_lo.numel() / 2**20)
            if step is not None:
                a_c, a_r = step.apply((a_lo + a_hi) / 2, False), step.apply_abs((a_hi - a_lo) / 2)
                b_c, b_r = step.apply((b_lo + b_hi) / 2, True), step.apply_abs((b_hi - b_lo) / 2)
                a_lo, a_hi, b_lo, b_hi = a_c - a_r, a_c + a_r, b_c - b_r, b_c + b_r
                i_c, i_r = step.apply((ibp_lo + ibp_hi) / 2, True), step.apply_abs((ibp_hi - ibp_lo) / 2)
                ibp_lo, ibp_hi = i_c - i_r, i_c + i_r
                continue
            shape = b_lo.shape
            lin_lo, lin_hi = a_lo.view(n, k, -1), a_hi.view(n, k, -1)
            lower = torch.maximum(b_lo.flatten(1) + lin_lo.clamp(max=0).sum(1), ibp_lo.flatten(1))
            upper = torch.minimum(b_hi.flatten(1) + lin_hi.clamp(min=0).sum(1), ibp_hi.flatten(1))
            states[index] = (lin_lo, lin_hi, b_lo.flatten(1), b_hi.flatten(1))
            earlier = list(bounds)[max(0, len(bounds) - depth):] if depth and lower.shape[1] <= BACK_NEURONS else []
            while earlier and lower.shape[1] * states[earlier[0]][2].shape[1] > BACK_ELEMENTS:
                earlier = earlier[1:]
            if earlier:
                if check is not None:
                    check(4 * 4 * n * lower.shape[1] * states[earlier[0]][2].shape[1] / 2**20)
                back_lo, back_hi = self._back(index, earlier[0], lower.shape[1], shapes, states, bounds)
                lower, upper = torch.maximum(lower, back_lo), torch.minimum(upper, back_hi)
            known = given[len(out)] if len(out) < len(given) else None
            if known is not None:
                lower, upper = torch.maximum(lower, known[0].flatten(1)), torch.minimum(upper, known[1].flatten(1))
            upper = torch.maximum(upper, lower)  # an empty intersection (rounding) stays a valid interval
            out.append((lower.view(shape), upper.view(shape)))
            bounds[index] = (lower, upper)
            lo_slope, up_slope, up_shift = relaxation(lower, upper)
            a_lo = (lin_lo * lo_slope[:, None]).view(n * k, *shape[1:])
            a_hi = (lin_hi * up_slope[:, None]).view(n * k, *shape[1:])
            b_lo = (b_lo.flatten(1) * lo_slope).view(shape)
            b_hi = (b_hi.flatten(1) * up_slope + up_shift).view(shape)
            ibp_lo, ibp_hi = lower.clamp(min=0).view(shape), upper.clamp(min=0).view(shape)
        return out

    def _back(self, index: int, close: int, neurons: int, shapes: list[tuple[int, ...]],
              states: dict[int, tuple[torch.Tensor, ...]], bounds: dict[int, tuple[torch.Tensor, torch.Tensor]],
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """CROWN bounds (n × neurons) on the input of the ReLU at step `index`: backward through the layers down
        to the ReLU at step `close` (relaxed), closed with the forward linear bounds of that ReLU's input."""
        a_lo, a_hi, b_lo, b_hi = states[close]
        n = len(b_lo)
        eye = torch.eye(neurons, dtype=b_lo.dtype, device=b_lo.device).expand(n, neurons, neurons)
        lam = {"lo": eye, "hi": eye}
        const = {side: torch.zeros(n, neurons, dtype=b_lo.dtype, device=b_lo.device) for side in lam}
        for position in range(index - 1, close - 1, -1):
            step = self.steps[position]
            if step is None:  # the lower bound takes a positive coefficient's lower relaxation, the upper its upper
                lo_slope, up_slope, up_shift = (t[:, None] for t in relaxation(*bounds[position]))
                for side in lam:
                    pos, neg = lam[side].clamp(min=0), lam[side].clamp(max=0)
                    if side == "lo":
                        const[side] = const[side] + (neg * up_shift).sum(-1)
                        lam[side] = pos * lo_slope + neg * up_slope
                    else:
                        const[side] = const[side] + (pos * up_shift).sum(-1)
                        lam[side] = pos * up_slope + neg * lo_slope
                continue
            bias = step.apply(torch.zeros(1, *shapes[position], dtype=b_lo.dtype, device=b_lo.device), True)
            bias = bias.flatten(1)[:, None]
            out_shape = shapes[position + 1]
            for side in lam:
                const[side] = const[side] + (lam[side] * bias).sum(-1)
                rows = lam[side].reshape(n * neurons, *out_shape)
                lam[side] = step.back(rows, shapes[position]).reshape(n, neurons, -1)
        pos, neg = lam["lo"].clamp(min=0), lam["lo"].clamp(max=0)
        lower = const["lo"] + (pos * b_lo[:, None]).sum(-1) + (neg * b_hi[:, None]).sum(-1) \
            + (pos @ a_lo.transpose(1, 2) + neg @ a_hi.transpose(1, 2)).clamp(max=0).sum(-1)
        pos, neg = lam["hi"].clamp(min=0), lam["hi"].clamp(max=0)
        upper = const["hi"] + (pos * b_hi[:, None]).sum(-1) + (neg * b_lo[:, None]).sum(-1) \
            + (pos @ a_hi.transpose(1, 2) + neg @ a_lo.transpose(1, 2)).clamp(min=0).sum(-1)
        return lower, upper


def relaxation(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CROWN's ReLU relaxation for input bounds [lower, upper]: (lower slope α, upper slope, upper intercept),
    so that α·z <= relu(z) <= slope·z + intercept on [lower, upper]."""
    active, inactive = lower >= 0, upper <= 0
    unstable = ~(active | inactive)
    up_slope = torch.where(unstable, upper / (upper - lower).clamp(min=1e-30), active.to(lower.dtype))
    lo_slope = torch.where(unstable, (upper >= -lower).to(lower.dtype), active.to(lower.dtype))
    return lo_slope, up_slope, torch.where(unstable, -up_slope * lower, 0.0)
