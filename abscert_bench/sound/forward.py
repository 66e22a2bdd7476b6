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

Forward bounds widen layer by layer through convolutions (on AbsCert DM_Large, after five of them, far looser than
CROWN's), so with `window` the unstable neurons of each convolutional ReLU layer are also
bounded by CROWN back to the input box, each over its receptive field only (`_window_back`): a neuron of the fifth
3×3 convolution depends on a 15×15 patch of the input, not on the whole 28×28 map, so its row of Λ is a window
that grows by the kernel at each layer, and a row stops as soon as a cheap closure shows its neuron stable. A row
that reaches the input gets CROWN's bound (never looser than auto_LiRPA's: tested) at the cost of its receptive
field, not of whole layers.

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

#: coordinates at most this wide stay intervals (the gap channel's outward-rounded ~1e-8 boxes)
VARIABLE_WIDTH = 1e-6
#: back-substitution of a ReLU input's bounds goes back through at most this many earlier ReLU layers (to the
#: input when earlier layers got receptive-field windows: their bounds are CROWN's then, and closing at their loose
#: forward linear bounds would throw that away; on AbsCert DM_Medium the root bound then equals CROWN's) ...
BACK_DEPTH = 3
#: ... for layers of at most this many neurons (a wide convolution's back-substitution costs more than it wins)
BACK_NEURONS = 1024
#: ... while its Λ (neurons × features at the closing layer, per domain) has at most this many entries
BACK_ELEMENTS = 2**24
#: a convolutional ReLU layer's unstable neurons are bounded by CROWN over their receptive fields
#: (`ForwardBounds._window_back`), this many MiB of Λ rows at a time
WINDOW_MB = 256
#: an affine layer maps at most this many coefficient maps between two checks of the time and memory limits
MAP_PART = 256


@dataclass
class Affine:
    """One affine layer: `apply(x, bias)` = W·x (+ β when bias), `apply_abs(x)` = |W|·x.

    `back(Λ, in_shape)` = Λ·W for m rows Λ (m × output shape → m × in_shape), for the backward pass.
    `window(Λ, top, left)` = the same for rows that are windows of a C×H×W map (m × C × a × b, row r's window
    starting at (top[r], left[r])): (Λ·W on the input windows, their tops and lefts, Λ·β per row), for layers
    that map each output position from a neighbourhood (convolution, BatchNorm2d, Identity); None otherwise.
    """

    apply: Callable[[torch.Tensor, bool], torch.Tensor]
    apply_abs: Callable[[torch.Tensor], torch.Tensor]
    back: Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]
    window: Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                     tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    #: `window` of unit rows (row r = 1 at output channel c[r] of a 1×1 window), without the product: for a
    #: convolution of one group that is the kernel of channel c placed on the input window, and the bias of c
    unit: Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                   tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None


def _affine(layer: nn.Module) -> Affine | None:
    # the layers' tensors are constants here (detached views: bounds never train the network)
    if isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
        w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
        stride, padding, dilation, groups = layer.stride, layer.padding, layer.dilation, layer.groups

        def window(lam: torch.Tensor, top: torch.Tensor, left: torch.Tensor):
            # output position p reads input positions p·stride - padding + i·dilation, i < kernel: a window of
            # a output positions reads (a - 1)·stride + (kernel - 1)·dilation + 1 input positions
            const = (lam.sum((2, 3)) * b).sum(1) if b is not None else lam.new_zeros(len(lam))
            lam_in = F.conv_transpose2d(lam, w, None, stride, 0, 0, groups, dilation)
            return lam_in, *corner(top, left), const

        def corner(top: torch.Tensor, left: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Where the input window of output windows starting at (top, left) starts."""
            return top * stride[0] - padding[0], left * stride[1] - padding[1]

        def back(lam: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
            # the transposed convolution onto the input's size (output padding: the rows and columns the convolution's
            # last window did not reach); ~10 % faster than torch.nn.grad.conv2d_input for the same result
            extra = tuple(size - ((out - 1) * s - 2 * p + d * (k - 1) + 1) for size, out, s, p, d, k in
                          zip(shape[1:], lam.shape[2:], stride, padding, dilation, w.shape[2:]))
            return F.conv_transpose2d(lam, w, None, stride, padding, extra, groups, dilation)

        def unit(c: torch.Tensor, top: torch.Tensor, left: torch.Tensor):
            return w[c], *corner(top, left), (b[c] if b is not None else w.new_zeros(len(c)))

        return Affine(lambda x, bias: F.conv2d(x, w, b if bias else None, stride, padding, dilation, groups),
                      lambda x: F.conv2d(x, w.abs(), None, stride, padding, dilation, groups),
                      back, window, unit if groups == 1 and tuple(dilation) == (1, 1) else None)
    if isinstance(layer, nn.Linear):
        w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
        return Affine(lambda x, bias: F.linear(x, w, b if bias else None), lambda x: F.linear(x, w.abs()),
                      lambda lam, shape: lam @ w)
    if isinstance(layer, nn.Flatten):
        return Affine(lambda x, bias: layer(x), layer, lambda lam, shape: lam.reshape(len(lam), *shape))
    if isinstance(layer, nn.Identity):
        return Affine(lambda x, bias: x, lambda x: x, lambda lam, shape: lam,
                      lambda lam, top, left: (lam, top, left, lam.new_zeros(len(lam))))
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) and not layer.training \
            and layer.running_mean is not None and layer.running_var is not None:
        with torch.no_grad():
            scale = torch.rsqrt(layer.running_var + layer.eps)
            if layer.weight is not None:
                scale = scale * layer.weight
            shift = -layer.running_mean * scale + (layer.bias if layer.bias is not None else 0.0)

        def shaped(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return t.view(1, -1, *([1] * (x.dim() - 2)))

        def channel_window(lam: torch.Tensor, top: torch.Tensor, left: torch.Tensor):
            return lam * shaped(scale, lam), top, left, (lam.sum((2, 3)) * shift).sum(1)

        return Affine(lambda x, bias: x * shaped(scale, x) + (shaped(shift, x) if bias else 0.0),
                      lambda x: x * shaped(scale.abs(), x), lambda lam, shape: lam * shaped(scale, lam),
                      channel_window if isinstance(layer, nn.BatchNorm2d) else None)
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
        upto: int | None = None, check: Callable[[float], None] | None = None, depth: int | None = None,
        window: bool = True,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Bounds (l, u) on the input of each of the first `upto` ReLUs (all by default) for n domains.

        Each ReLU input's bounds are the forward ones, intersected with interval bounds and, where its Λ fits
        (BACK_ELEMENTS), with a CROWN back-substitution through the last `depth` ReLU layers before it (default:
        BACK_DEPTH, or to the input once a layer got windows), closed at the pre-activation there with that
        layer's forward linear bounds (Λ⁺·lower + Λ⁻·upper: a product with the k coefficient maps) or at the input
        box. The back-substitution chooses each earlier ReLU's relaxation per output neuron, which forward bounds
        cannot, and costs (neurons × features × k), not a backward pass to the input.

        `given[r]`: sound bounds already known for ReLU r's input (or None); the result is intersected with
        them. `check(mb)` is called before each layer with an estimate of the memory it will allocate.
        """
        upto = self.relus if upto is None else upto
        n = len(x_lo)
        a_in, b_in = _input_state(x_lo, x_hi)
        k = a_in.shape[1]
        a_lo = a_hi = a_in.view(n * k, *x_lo.shape[1:])  # A_lo = A_hi until the first unstable ReLU
        b_lo, b_hi = x_lo, b_in.view_as(x_lo)
        ibp_lo, ibp_hi = x_lo, x_hi
        back_depth = BACK_DEPTH if depth is None else depth
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        shapes: list[tuple[int, ...]] = []  # each step's input shape
        states: dict[int, tuple[torch.Tensor, ...]] = {}  # ReLU step: (A_lo, A_hi, b_lo, b_hi) of its input
        states[-1] = (a_lo.view(n, k, -1), a_lo.view(n, k, -1), b_lo.flatten(1), b_hi.flatten(1))  # (the input's)
        bounds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # ReLU step: its input bounds
        for index, step in enumerate(self.steps):
            if len(out) == upto:
                break
            shapes.append(tuple(b_lo.shape[1:]))
            if check is not None:
                check(4 * 2 * a_lo.numel() / 2**20)
            if step is not None:
                a_c = _in_parts(step.apply, (a_lo + a_hi) / 2, check, False)
                a_r = _in_parts(step.apply_abs, (a_hi - a_lo) / 2, check)
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
            known = given[len(out)] if len(out) < len(given) else None
            if known is not None:
                lower, upper = torch.maximum(lower, known[0].flatten(1)), torch.minimum(upper, known[1].flatten(1))
            if window and self.windowed(index, shapes):
                lower, upper = self._window_bounds(index, lower, upper, x_lo, x_hi, shapes, bounds, check)
                back_depth = self.relus if depth is None else depth
            # back-substitution for the unstable neurons only (r rows per domain: its unstable ones, then stable
            # ones as padding, whose bounds are as sound)
            unstable = (lower < 0) & (upper > 0)
            r = int(unstable.sum(1).max()) if n else 0
            # the closing layer: the ReLU `back_depth` ReLU layers back, or the input (-1) when there are fewer
            earlier = [-1, *bounds] if back_depth > len(bounds) else list(bounds)[len(bounds) - back_depth:]
            if not (r and back_depth and lower.shape[1] <= BACK_NEURONS):
                earlier = []
            while earlier and r * _widest(shapes, earlier[0], index) > BACK_ELEMENTS:
                earlier = earlier[1:]
            if earlier:
                if check is not None:
                    check(4 * 4 * n * r * _widest(shapes, earlier[0], index) / 2**20)
                order = torch.argsort(unstable.to(torch.int8), dim=1, descending=True, stable=True)[:, :r]
                lower, upper = self._back(index, earlier[0], order, lower, upper, shapes, states, bounds)
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

    def refreshed(
        self, x_lo: torch.Tensor, x_hi: torch.Tensor, given: list[tuple[torch.Tensor, torch.Tensor]],
        check: Callable[[float], None] | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """CROWN bounds on every ReLU input of n domains, without a forward pass: `given[r]` are sound bounds on
        ReLU r's input (a branch-and-bound parent's); layer by layer, the neurons they leave unstable are bounded
        by CROWN back to the input box with the bounds already refreshed below — a layer of C×H×W maps over
        receptive fields (`_window_back`), any other by dense back-substitution (`_back`, no closure on the way) —
        and intersected with `given`. None where the network has a layer neither reaches (a dense layer wider than
        BACK_NEURONS, or rows past BACK_ELEMENTS)."""
        n = len(x_lo)
        a_in, b_in = _input_state(x_lo, x_hi)
        states: dict[int, tuple[torch.Tensor, ...]] = {-1: (a_in, a_in, x_lo.flatten(1), b_in)}
        shapes = self.shapes(x_lo)
        bounds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        relu = 0
        for index, step in enumerate(self.steps):
            if step is not None:
                continue
            lower, upper = (t.flatten(1) for t in given[relu])
            relu += 1
            if self.windowed(index, shapes):
                lower, upper = self._window_bounds(index, lower, upper, x_lo, x_hi, shapes, bounds, check)
            else:
                unstable = (lower < 0) & (upper > 0)
                r = int(unstable.sum(1).max()) if n else 0
                if r:
                    if lower.shape[1] > BACK_NEURONS or r * _widest(shapes, -1, index) > BACK_ELEMENTS:
                        return None
                    if check is not None:
                        check(4 * 4 * n * r * _widest(shapes, -1, index) / 2**20)
                    order = torch.argsort(unstable.to(torch.int8), dim=1, descending=True, stable=True)[:, :r]
                    lower, upper = self._back(index, -1, order, lower, upper, shapes, states, bounds)
            upper = torch.maximum(upper, lower)
            bounds[index] = (lower, upper)
            out.append((lower.view(-1, *shapes[index]), upper.view(-1, *shapes[index])))
        return out

    def shapes(self, like: torch.Tensor) -> list[tuple[int, ...]]:
        """Each step's input shape (without the batch dimension) for inputs shaped like `like`, then the output's."""
        shapes: list[tuple[int, ...]] = []
        probe = like[:1]
        with torch.no_grad():
            for step in self.steps:
                shapes.append(tuple(probe.shape[1:]))
                if step is not None:
                    probe = step.apply(probe, True)
        return [*shapes, tuple(probe.shape[1:])]

    def windowed(self, index: int, shapes: list[tuple[int, ...]]) -> bool:
        """Whether every step before `index` maps C×H×W maps by neighbourhoods (see `Affine.window`)."""
        return all(len(shapes[p]) == 3 and (step is None or step.window is not None)
                   for p, step in enumerate(self.steps[:index]))

    def _window_bounds(self, index: int, lower: torch.Tensor, upper: torch.Tensor, x_lo: torch.Tensor,
                       x_hi: torch.Tensor, shapes: list[tuple[int, ...]],
                       bounds: dict[int, tuple[torch.Tensor, torch.Tensor]],
                       check: Callable[[float], None] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`lower`, `upper` (n × neurons) of the ReLU input at step `index`, its unstable neurons tightened by
        CROWN back to the input box (`_window_back`), WINDOW_MB of rows at a time."""
        rows, neurons = torch.nonzero((lower < 0) & (upper > 0), as_tuple=True)
        if not len(rows):
            return lower, upper
        _, h, w = shapes[index]
        per_row = 4 * 6 * self._window_features(index, shapes, x_lo) / 2**20  # Λ lo/hi, their in-step copies, slopes
        chunk = max(1, int(WINDOW_MB / per_row))
        lower, upper = lower.clone(), upper.clone()
        for start in range(0, len(rows), chunk):
            if check is not None:
                check(per_row * min(chunk, len(rows) - start))
            d, j = rows[start:start + chunk], neurons[start:start + chunk]
            lower[d, j], upper[d, j] = self._window_back(index, d, j // (h * w), j // w % h, j % w, lower[d, j],
                                                         upper[d, j], x_lo, x_hi, shapes, bounds)
        return lower, upper

    def _window_features(self, index: int, shapes: list[tuple[int, ...]], like: torch.Tensor) -> int:
        """The largest window (channels × height × width) one row of `_window_back` from step `index` reaches."""
        lam = like.new_zeros(1, shapes[index][0], 1, 1)
        top = left = torch.zeros(1, dtype=torch.int64, device=like.device)
        largest = lam.numel()
        for position in range(index - 1, -1, -1):
            step = self.steps[position]
            if step is not None:
                assert step.window is not None  # `windowed` said so
                lam, top, left, _ = step.window(lam, top, left)
                lam, top, left = _fit(lam, top, left, shapes[position])
            largest = max(largest, lam.numel())
        return largest

    def _window_back(self, index: int, d: torch.Tensor, c: torch.Tensor, y: torch.Tensor, x: torch.Tensor,
                     lower: torch.Tensor, upper: torch.Tensor, x_lo: torch.Tensor, x_hi: torch.Tensor,
                     shapes: list[tuple[int, ...]], bounds: dict[int, tuple[torch.Tensor, torch.Tensor]],
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds `lower`, `upper` on neurons (c, y, x) of the ReLU input at step `index` of domains d, tightened by
        CROWN back to the input box.

        Row r of Λ is kept as a window of each layer: the positions that neuron r depends on (a convolution's
        receptive field grows by its kernel at each layer), starting at (top[r], left[r]); positions outside the
        map are the convolutions' zero padding and are masked out. Each ReLU step uses the relaxation of the
        bounds already found for it, as a CROWN backward pass does, so a row that reaches the input gets CROWN's
        bound at the cost of its receptive field instead of whole layers. Before each ReLU step the rows are also
        closed with the interval bounds of that ReLU's output (cheap, and sound at any depth); a row whose bounds
        so far show the neuron stable (lower >= 0 or upper <= 0) stops there, since a stable neuron's relaxation
        is exact whatever its bounds — most of a deep layer's rows that the forward bounds leave unstable do.
        """
        m = len(d)
        lower, upper = lower.clone(), upper.clone()
        alive = torch.arange(m, device=d.device)
        lam = torch.zeros(m, shapes[index][0], 1, 1, dtype=x_lo.dtype, device=x_lo.device)
        lam[alive, c, 0, 0] = 1.0
        lam_lo = lam_hi = lam
        unit: torch.Tensor | None = c  # the rows are still the unit rows of channels c (see `Affine.unit`)
        top, left = y.clone(), x.clone()
        const_lo = torch.zeros(m, dtype=x_lo.dtype, device=x_lo.device)
        const_hi = const_lo.clone()

        relaxed = False
        for position in range(index - 1, -1, -1):
            step = self.steps[position]
            if step is None:  # the lower bound takes a positive coefficient's lower relaxation, the upper its upper
                if relaxed:  # (one layer back, the box closure would only be the interval bound)
                    # Λ over this ReLU's output interval, as Λ·centre ∓ |Λ|·radius (no sign split before the rows
                    # that stop here are dropped)
                    below, above = (t.clamp(min=0).view(-1, *shapes[position]) for t in bounds[position])
                    centre, radius = (_gather(t, d, top, left, *lam_lo.shape[2:])
                                      for t in ((above + below) / 2, (above - below) / 2))
                    lower[alive] = torch.maximum(lower[alive], const_lo + _dot(lam_lo, centre)
                                                 - _dot(lam_lo.abs(), radius))
                    upper[alive] = torch.minimum(upper[alive], const_hi + _dot(lam_hi, centre)
                                                 + _dot(lam_hi.abs(), radius))
                    keep = (lower[alive] < 0) & (upper[alive] > 0)
                    if not bool(keep.all()):
                        alive, d, top, left = alive[keep], d[keep], top[keep], left[keep]
                        const_lo, const_hi, lam_lo, lam_hi = const_lo[keep], const_hi[keep], lam_lo[keep], lam_hi[keep]
                        if not len(alive):
                            return lower, upper
                signs: tuple[torch.Tensor, ...] = _signs(lam_lo, lam_hi)
                slopes = tuple(_gather(t.view(-1, *shapes[position]), d, top, left, *lam_lo.shape[2:])
                               for t in relaxation(*bounds[position]))
                relaxed = True
                lam_lo, lam_hi, add_lo, add_hi = _relax_back(signs, slopes, _dot)
                const_lo, const_hi = const_lo + add_lo, const_hi + add_hi
                continue
            assert step.window is not None  # `windowed` said so
            if lam_hi is lam_lo:  # (until the first ReLU step back both sides carry the same Λ: one product)
                if unit is not None and step.unit is not None:
                    lam_lo, new_top, new_left, add = step.unit(unit, top, left)
                else:
                    lam_lo, new_top, new_left, add = step.window(lam_lo, top, left)
                unit = None
                lam_lo, top, left = _fit(lam_lo, new_top, new_left, shapes[position])
                lam_hi, const_lo = lam_lo, const_lo + add
                const_hi = const_lo.clone()
                continue
            lam_lo, new_top, new_left, add = step.window(lam_lo, top, left)
            const_lo = const_lo + add
            lam_hi, _, _, add = step.window(lam_hi, top, left)
            const_hi = const_hi + add
            lam_lo, _, _ = _fit(lam_lo, new_top, new_left, shapes[position])
            lam_hi, top, left = _fit(lam_hi, new_top, new_left, shapes[position])
        # at the input box: Λ⁺ takes the box's lower end for the lower bound, Λ⁻ its upper end (the reverse for the
        # upper bound)
        lo_win, hi_win = (_gather(t, d, top, left, *lam_lo.shape[2:]) for t in (x_lo, x_hi))
        lo_pos, lo_neg, hi_pos, hi_neg = _signs(lam_lo, lam_hi)
        lower[alive] = torch.maximum(lower[alive], const_lo + _dot(lo_pos, lo_win) + _dot(lo_neg, hi_win))
        upper[alive] = torch.minimum(upper[alive], const_hi + _dot(hi_pos, hi_win) + _dot(hi_neg, lo_win))
        return lower, upper

    def _back(self, index: int, close: int, rows: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
              shapes: list[tuple[int, ...]], states: dict[int, tuple[torch.Tensor, ...]],
              bounds: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds `lower`, `upper` (n × neurons) of the input of the ReLU at step `index`, its neurons `rows` (n × r)
        tightened by CROWN backward through the layers down to the ReLU at step `close`.

        After each ReLU step back the rows are closed with the forward linear bounds of that ReLU's input (the
        bound a back-substitution stopping there gives; a product with the k coefficient maps), and rows whose
        neuron is then stable in every domain go no further — deeper steps cost more (wider layers)."""
        lower, upper = lower.clone(), upper.clone()
        unit = F.one_hot(rows, lower.shape[1]).to(lower.dtype)
        lam = {"lo": unit, "hi": unit}
        const = {side: torch.zeros(*rows.shape, dtype=lower.dtype, device=lower.device) for side in lam}
        for position in range(index - 1, close - 1, -1):
            step = self.steps[position]
            n, r = rows.shape
            if step is None:
                lam["lo"], lam["hi"], add_lo, add_hi = _relax_columns(lam["lo"], lam["hi"], *bounds[position])
                const["lo"], const["hi"] = const["lo"] + add_lo, const["hi"] + add_hi
            else:
                bias = bias_map(step, shapes[position], lower)
                out_shape = shapes[position + 1]
                same = lam["hi"] is lam["lo"]  # (until the first ReLU step back both sides carry the same Λ)
                for side in ("lo",) if same else ("lo", "hi"):
                    flat = lam[side].reshape(n * r, -1)
                    if bias is not None:
                        const[side] = const[side] + (flat @ bias).view(n, r)
                    flat = flat.view(n * r, *out_shape)
                    lam[side] = step.back(flat, shapes[position]).reshape(n, r, -1)
                if same:
                    lam["hi"], const["hi"] = lam["lo"], const["lo"].clone()
                if position > 0:
                    continue
            # at a ReLU's input (where its forward bounds are known), or at the network's input
            state = states.get(position if step is None else -1)
            if state is None:
                continue
            row_lo, row_hi = _close(lam["lo"], lam["hi"], const["lo"], const["hi"], state)
            lower.scatter_(1, rows, torch.maximum(lower.gather(1, rows), row_lo))
            upper.scatter_(1, rows, torch.minimum(upper.gather(1, rows), row_hi))
            going = ((lower.gather(1, rows) < 0) & (upper.gather(1, rows) > 0)).any(0)
            if position == max(close, 0) or not bool(going.any()):
                break
            if not bool(going.all()):
                rows, lam["lo"], lam["hi"] = rows[:, going], lam["lo"][:, going], lam["hi"][:, going]
                const["lo"], const["hi"] = const["lo"][:, going], const["hi"][:, going]
        return lower, upper


def _input_state(x_lo: torch.Tensor, x_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input box as linear bounds over the domains' variables: x = b + A·s, s in [0, 1]^k, one variable per
    coordinate wider than VARIABLE_WIDTH (variable j of domain i is its j-th wide coordinate; padding variables have
    no coefficient). Returns A (n × k × features) and the upper end of b (n × features): a variable's bias is its
    lower end (b's lower end is x_lo), a narrow coordinate stays the interval [x_lo, x_hi]."""
    n = len(x_lo)
    width = (x_hi - x_lo).flatten(1)
    wide = width > VARIABLE_WIDTH
    k = max(1, ForwardBounds.variables(x_lo, x_hi))
    rank = torch.cumsum(wide.to(torch.int64), 1) - 1
    rows, coords = torch.nonzero(wide, as_tuple=True)
    a_in = torch.zeros(n, k, width.shape[1], dtype=x_lo.dtype, device=x_lo.device)
    a_in[rows, rank[rows, coords], coords] = width[rows, coords]
    return a_in, torch.where(wide, x_lo.flatten(1), x_hi.flatten(1))


def _widest(shapes: list[tuple[int, ...]], close: int, index: int) -> int:
    """The most features a back-substitution row has between step `index` and the ReLU at step `close` (-1: the
    input)."""
    return max(int(torch.Size(shapes[p]).numel()) for p in range(max(close, 0), index))


def _close(lam_lo: torch.Tensor, lam_hi: torch.Tensor, const_lo: torch.Tensor, const_hi: torch.Tensor,
           state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds (n × r) of const + Λ·z for rows Λ (n × r × F) over a layer's forward linear bounds
    b_lo + A_lo·s <= z <= b_hi + A_hi·s (`state` = (A_lo, A_hi, b_lo, b_hi), A: n × k × F), s in the unit box:
    one product per sign with [A | b]."""
    a_lo, a_hi, b_lo, b_hi = state
    k = a_lo.shape[1]
    ab_lo, ab_hi = (torch.cat([a, b[:, None]], 1).transpose(1, 2) for a, b in ((a_lo, b_lo), (a_hi, b_hi)))
    terms = lam_lo.clamp(min=0) @ ab_lo + lam_lo.clamp(max=0) @ ab_hi
    lower = const_lo + terms[..., k] + terms[..., :k].clamp(max=0).sum(-1)
    terms = lam_hi.clamp(min=0) @ ab_hi + lam_hi.clamp(max=0) @ ab_lo
    return lower, const_hi + terms[..., k] + terms[..., :k].clamp(min=0).sum(-1)


def _signs(lam_lo: torch.Tensor, lam_hi: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(Λ_lo⁺, Λ_lo⁻, Λ_hi⁺, Λ_hi⁻), each computed once where both sides are the same Λ."""
    lo_pos, lo_neg = lam_lo.clamp(min=0), lam_lo.clamp(max=0)
    if lam_hi is lam_lo:
        return lo_pos, lo_neg, lo_pos, lo_neg
    return lo_pos, lo_neg, lam_hi.clamp(min=0), lam_hi.clamp(max=0)


def _relax_back(signs: tuple[torch.Tensor, ...], slopes: tuple[torch.Tensor, ...],
                dot: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One CROWN backward step through a ReLU for the lower and upper bound's Λ, given their signs
    (Λ_lo⁺, Λ_lo⁻, Λ_hi⁺, Λ_hi⁻) and the relaxation (lower slope, upper slope, upper intercept): the lower bound
    takes a positive coefficient's lower relaxation and a negative one's upper, the upper bound the reverse.
    Returns Λ_lo, Λ_hi and the constants the upper intercept adds to each (`dot(Λ part, intercept)`)."""
    lo_pos, lo_neg, hi_pos, hi_neg = signs
    lo_slope, up_slope, up_shift = slopes
    lam_lo, add_lo = relax_side(lo_pos, lo_neg, lo_slope, up_slope, up_shift, dot)
    lam_hi, add_hi = relax_side(hi_neg, hi_pos, lo_slope, up_slope, up_shift, dot)
    return lam_lo, lam_hi, add_lo, add_hi


def relax_side(lower_part: torch.Tensor, upper_part: torch.Tensor, lo_slope: torch.Tensor, up_slope: torch.Tensor,
               up_shift: torch.Tensor, dot: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One side of `_relax_back`: the coefficients `lower_part` take the ReLU's lower relaxation (slope `lo_slope`),
    `upper_part` its upper line (`up_slope`, intercept `up_shift`) — for a lower bound the positive and negative parts
    of Λ, for an upper bound the reverse. Returns the new Λ and the constant `dot(upper_part, up_shift)`."""
    return lower_part * lo_slope + upper_part * up_slope, dot(upper_part, up_shift)


def bias_map(step: Affine, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
    """An affine step's constant term on inputs of `shape` (flattened, dtype and device of `like`), None when it is 0
    (Flatten, bias-free layers)."""
    with torch.no_grad():
        bias = step.apply(torch.zeros(1, *shape, dtype=like.dtype, device=like.device), True).reshape(-1)
    return bias if bool(bias.any()) else None


def _relax_columns(lam_lo: torch.Tensor, lam_hi: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_relax_back` for dense rows Λ (n × r × F) through a ReLU with input bounds `lower`, `upper` (n × F).

    A stable neuron's relaxation is one slope for both bounds (1 or 0, no intercept), so its columns of Λ are
    only scaled; the sign split runs on the columns unstable in some domain alone (most of a layer's neurons are
    stable). The result is `_relax_back` on all columns (up to the float32 order of the intercept sums)."""
    lo_slope, up_slope, up_shift = relaxation(lower, upper)
    new_lo, new_hi = lam_lo * up_slope[:, None], lam_hi * up_slope[:, None]
    cols = torch.nonzero(((lower < 0) & (upper > 0)).any(0)).view(-1)
    if not len(cols):
        zero = lam_lo.new_zeros(lam_lo.shape[:2])
        return new_lo, new_hi, zero, zero.clone()
    part_lo, part_hi = lam_lo.index_select(2, cols), lam_hi.index_select(2, cols)
    signs = (part_lo.clamp(min=0), part_lo.clamp(max=0), part_hi.clamp(min=0), part_hi.clamp(max=0))
    slopes = tuple(t.index_select(1, cols)[:, None] for t in (lo_slope, up_slope, up_shift))
    part_lo, part_hi, add_lo, add_hi = _relax_back(signs, slopes, lambda a, b: (a * b).sum(-1))
    new_lo[:, :, cols], new_hi[:, :, cols] = part_lo, part_hi
    return new_lo, new_hi, add_lo, add_hi


def _in_parts(fn: Callable[..., torch.Tensor], maps: torch.Tensor, check: Callable[[float], None] | None,
              *args: bool) -> torch.Tensor:
    """fn(maps, *args) over the coefficient maps MAP_PART at a time, calling `check` between parts (a time limit
    then stops a forward pass over many input variables within one layer)."""
    if check is None or len(maps) <= MAP_PART:
        return fn(maps, *args)
    parts = []
    for part in maps.split(MAP_PART):
        check(0.0)
        parts.append(fn(part, *args))
    return torch.cat(parts)


def _gather(t: torch.Tensor, d: torch.Tensor, top: torch.Tensor, left: torch.Tensor, ah: int, aw: int) -> torch.Tensor:
    """Windows of maps t (n × C × H × W): row r is t[d[r], :, top[r]:top[r] + ah, left[r]:left[r] + aw], with 0
    where the window leaves the map."""
    _, _, h, w = t.shape
    pad_t, pad_b = max(0, -int(top.min())), max(0, int(top.max()) + ah - h)
    pad_l, pad_r = max(0, -int(left.min())), max(0, int(left.max()) + aw - w)
    padded = F.pad(t, (pad_l, pad_r, pad_t, pad_b))
    # a view of every window (n × H' × W' × C × ah × aw, no copy); indexing it copies whole windows
    windows = padded.unfold(2, ah, 1).unfold(3, aw, 1).permute(0, 2, 3, 1, 4, 5)
    return windows[d, top + pad_t, left + pad_l]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of m × … tensors (a batched matrix product, no m × … temporary)."""
    return torch.bmm(a.reshape(len(a), 1, -1), b.reshape(len(b), -1, 1)).view(-1)


def _fit(lam: torch.Tensor, top: torch.Tensor, left: torch.Tensor, shape: tuple[int, ...],
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Windows lam (m × C × a × b at top, left) of a C×H×W map with the positions off the map zeroed; a window
    larger than the map becomes the whole map."""
    _, h, w = shape
    ah, aw = lam.shape[2:]
    if ah > h or aw > w:  # re-cut as the whole map: window row r of the map is lam row r shifted by its corner
        rows = torch.arange(len(lam), device=lam.device)
        return _gather(lam, rows, -top, -left, h, w), torch.zeros_like(top), torch.zeros_like(left)
    ys = top[:, None] + torch.arange(ah, device=lam.device)
    xs = left[:, None] + torch.arange(aw, device=lam.device)
    inside = ((ys >= 0) & (ys < h))[:, None, :, None] & ((xs >= 0) & (xs < w))[:, None, None, :]
    return lam * inside, top, left


def relaxation(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CROWN's ReLU relaxation for input bounds [lower, upper]: (lower slope α, upper slope, upper intercept),
    so that α·z <= relu(z) <= slope·z + intercept on [lower, upper]."""
    active, inactive = lower >= 0, upper <= 0
    unstable = ~(active | inactive)
    up_slope = torch.where(unstable, upper / (upper - lower).clamp(min=1e-30), active.to(lower.dtype))
    lo_slope = torch.where(unstable, (upper >= -lower).to(lower.dtype), active.to(lower.dtype))
    return lo_slope, up_slope, torch.where(unstable, -up_slope * lower, 0.0)
