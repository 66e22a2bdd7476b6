"""Margin bounds with optimised ReLU lower slopes over fixed ReLU-input bounds (α-CROWN on the output only).

CROWN bounds a margin c·N(x) from below by one backward pass: at every unstable ReLU (input bounds l < 0 < u) a
negative coefficient takes the upper line u/(u − l)·(z − l) and a positive one a lower line α·z; any α in [0, 1]
gives a sound bound, and CROWN picks α = 1 if u >= −l else 0 for every row alike. α-CROWN instead optimises α per
margin row and neuron by gradient ascent on the bound itself. Optimising also the intermediate layers' slopes (as
auto_LiRPA's 'CROWN-Optimized' does by default) needs a backward pass per intermediate neuron and iteration — 3–6 s
a bound on AbsCert DM_Medium, measured earlier — while with the ReLU-input bounds held fixed (the forward / window
bounds `HullBounder` already computed) an iteration is one backward pass of the K − 1 margin rows through dense
maps, a few milliseconds there.

Every iterate is a CROWN bound with α clamped into [0, 1], so each is sound given sound ReLU-input bounds (the same
float32 arithmetic as CROWN's); the result is the best bound of each row over the iterates, and at iterate 0 (α
as CROWN picks it) it is CROWN's bound. Supported: the chain networks of `forward.ForwardBounds`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .forward import ForwardBounds, bias_map, relax_side, relaxation

#: Adam's step on the slopes (α in [0, 1]); iterations stop early once every row is positive, or after PATIENCE
#: iterations without a better total
LEARNING_RATE = 0.5
PATIENCE = 4


def optimized_margins(
    forward: ForwardBounds, x_lo: torch.Tensor, x_hi: torch.Tensor,
    relu_bounds: list[tuple[torch.Tensor, torch.Tensor]], spec: torch.Tensor, iterations: int,
    check: Callable[[float], None] | None = None, lr: float = LEARNING_RATE,
) -> torch.Tensor:
    """Lower bounds (n × S) on spec·N(x) over the boxes [x_lo, x_hi] (n domains, spec: n × S × outputs), the best
    of `iterations` + 1 CROWN passes whose lower slopes at unstable ReLUs are optimised (iterate 0: CROWN's).

    `relu_bounds[r]`: sound bounds on ReLU r's input for each domain (n × its shape). `check(mb)` is called before
    each pass (time and memory limits); a pass it stops leaves the bounds found so far unreturned — the caller
    keeps its CROWN bounds then."""
    n, rows = spec.shape[:2]
    shapes = forward.shapes(x_lo)
    biases = [None if step is None else bias_map(step, shape, x_lo) for step, shape in zip(forward.steps, shapes)]
    fixed, alphas = [], []
    for lower, upper in relu_bounds:
        lower, upper = lower.reshape(n, -1).detach(), upper.reshape(n, -1).detach()
        lo_slope, up_slope, up_shift = relaxation(lower, upper)
        unstable = (lower < 0) & (upper > 0)
        fixed.append((lo_slope[:, None], up_slope[:, None], up_shift[:, None], unstable[:, None]))
        alphas.append(lo_slope[:, None].expand(n, rows, -1).clone().requires_grad_(True))
    box_lo, box_hi = x_lo.reshape(n, 1, -1), x_hi.reshape(n, 1, -1)

    def bound() -> torch.Tensor:
        lam = spec.reshape(n * rows, -1)
        const = spec.new_zeros(n, rows)
        relu = len(fixed)
        for index in range(len(forward.steps) - 1, -1, -1):
            step = forward.steps[index]
            if step is None:
                relu -= 1
                lo_slope, up_slope, up_shift, unstable = fixed[relu]
                slope = torch.where(unstable, alphas[relu].clamp(0.0, 1.0), lo_slope)
                flat = lam.reshape(n, rows, -1)
                lam, add = relax_side(flat.clamp(min=0), flat.clamp(max=0), slope, up_slope, up_shift,
                                      lambda a, b: (a * b).sum(-1))
                const, lam = const + add, lam.reshape(n * rows, -1)
                continue
            bias = biases[index]
            if bias is not None:
                const = const + (lam.reshape(n, rows, -1) * bias).sum(-1)
            lam = step.back(lam.reshape(n * rows, *shapes[index + 1]), shapes[index]).reshape(n * rows, -1)
        flat = lam.reshape(n, rows, -1)
        return const + (flat.clamp(min=0) * box_lo).sum(-1) + (flat.clamp(max=0) * box_hi).sum(-1)

    optimizer = torch.optim.Adam(alphas, lr=lr)
    best = None
    stale, previous = 0, -float("inf")
    for iteration in range(iterations + 1):
        if check is not None:
            check(0.0)
        with torch.enable_grad():  # (callers may run under no_grad)
            margins = bound()
        value = margins.detach()
        best = value if best is None else torch.maximum(best, value)
        total = float(best.sum())  # (never falls: the best rows only rise)
        stale = 0 if total > previous + 1e-6 * max(1.0, abs(previous)) else stale + 1
        previous = total
        if iteration == iterations or bool((best > 0).all()) or stale >= PATIENCE:
            break
        # rows already positive need no more (each row has its own slopes, so the rows are independent)
        with torch.enable_grad():
            grads = torch.autograd.grad(-(margins * (best <= 0)).sum(), alphas)
        for alpha, grad in zip(alphas, grads):
            alpha.grad = grad
        optimizer.step()
    assert best is not None
    return best
