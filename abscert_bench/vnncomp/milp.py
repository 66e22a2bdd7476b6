"""A complete method for small ReLU networks: the VNN-LIB property as a mixed-integer linear program (HiGHS).

`extract` reads a loaded ONNX network (our `OnnxModule`) as a piecewise-linear function: with every ReLU output
replaced by a free variable, each ReLU input and the network output are affine in (x, a_1, …, a_m), the input and
all ReLU outputs in graph order (skip connections and the hull network's `1 - relu(1 - (lower + d))` included).
Their coefficients are found by running the graph in float64 on the basis vectors, and checked to be affine on
random points (a graph with Floor, Sigmoid, Max, … is refused: `None`).

`decide` then solves, per disjunct of the output condition, min t s.t. A·y - b <= t, t <= UNSAT_MARGIN over the
input box with the standard big-M encoding of each ReLU whose interval bounds straddle 0 (a = max(z, 0) exactly:
a >= z, a >= 0, a <= u·δ, a <= z - l·(1 - δ), δ binary). `unsat` when HiGHS proves every disjunct's program
infeasible (no point with t <= `UNSAT_MARGIN`; the bound on t lets it prune every node whose relaxation is above the
margin instead of closing the optimality gap); `sat` only when a solution's input,
run through the real (float32) network, satisfies the property; else `unknown`. The margin absorbs the solver's
feasibility tolerances (1e-6 by default in HiGHS) and the float64 extraction error of the coefficients; a property
that holds with a margin below it is left `unknown`, never guessed.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .onnx_loader import OnnxModule
from .vnnlib import VnnlibProperty

LP_SHARE = 0.3  # at most this share of an instance's MILP time goes to LP bound tightening
MILP_INFEASIBLE = 2  # scipy.optimize.milp's status for a problem proven infeasible
UNSAT_MARGIN = 1e-4  # a disjunct is refuted only when its proven min of max_i(A_i·y - b_i) exceeds this
AFFINE_TOLERANCE = 1e-6  # relative error allowed when checking that the graph is affine between ReLUs
MAX_VARIABLES = 20_000  # inputs + ReLU neurons above which the program is not built (too big to be useful)


@dataclass
class PiecewiseLinear:
    """y = out_w·v + out_b with v = [x, a_1, …, a_m] and ReLU k's input z_k = w_k·v + b_k, a_k = max(z_k, 0).

    Layer k's rows only use the entries of v before a_k (graph order)."""

    n_inputs: int
    layers: list[tuple[np.ndarray, np.ndarray]]
    out_w: np.ndarray
    out_b: np.ndarray

    @property
    def n_variables(self) -> int:
        return self.n_inputs + sum(len(b) for _, b in self.layers)

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        """The network's outputs at x (float64), through the extracted coefficients."""
        v = np.asarray(x, dtype=np.float64).reshape(-1)
        for w, b in self.layers:
            v = np.concatenate([v, np.maximum(w @ v[: w.shape[1]] + b, 0.0)])
        return self.out_w @ v + self.out_b


def extract(model: OnnxModule) -> PiecewiseLinear | None:
    """The piecewise-linear form of a ReLU network, or None when the graph is not one (or is too large)."""
    if any(op not in PIECEWISE_LINEAR_OPS for op in model.op_types):
        return None
    double = model.float64_copy()
    shape = (1, *model.input_shape[1:])
    n_in = int(np.prod(shape))
    with torch.no_grad():
        sizes = [int(z[0].numel()) for z in double.run(torch.zeros(shape, dtype=torch.float64))[0]]
    total = n_in + sum(sizes)
    if total > MAX_VARIABLES:
        return None

    def outputs(v: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(ReLU inputs, output) for a batch of variable vectors v (B × total), ReLU outputs taken from v."""
        x = v[:, :n_in].reshape(len(v), *shape[1:])
        replace, start = [], n_in
        for size in sizes:
            replace.append(v[:, start:start + size])
            start += size
        return double.run(x, replace_relus=replace)

    basis = torch.cat([torch.zeros(1, total, dtype=torch.float64), torch.eye(total, dtype=torch.float64)])
    with torch.no_grad():
        try:
            relu_inputs, y = outputs(basis)
        except RuntimeError:  # a graph whose shapes fix the batch to 1: one vector at a time
            parts = [outputs(basis[i:i + 1]) for i in range(len(basis))]
            relu_inputs = [torch.cat([p[0][k] for p in parts]) for k in range(len(sizes))]
            y = torch.cat([p[1] for p in parts])
    layers, start = [], n_in
    for k, relu_input in enumerate(relu_inputs):
        z = relu_input.reshape(len(basis), -1).numpy()
        w = (z[1:] - z[0]).T[:, :start]
        layers.append((np.ascontiguousarray(w), z[0].copy()))
        start += sizes[k]
    out = y.reshape(len(basis), -1).numpy()
    form = PiecewiseLinear(n_in, layers, np.ascontiguousarray((out[1:] - out[0]).T), out[0].copy())
    # affine between ReLUs: the coefficients reproduce the graph on random inputs (ReLUs included)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 0.5
        with torch.no_grad():
            expected = double.run(x)[1].reshape(-1).numpy()
        got = form.evaluate(x.numpy())
        if not np.allclose(got, expected, rtol=AFFINE_TOLERANCE, atol=AFFINE_TOLERANCE * (1 + np.abs(expected).max())):
            return None
    return form


# the ops of a network that is affine between its ReLUs (Mul / Div are checked to have a constant operand by the
# affinity test in `extract`)
PIECEWISE_LINEAR_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Neg", "Conv", "Gemm", "MatMul", "Flatten", "Reshape",
                                  "Identity", "Concat", "AveragePool", "Relu", "Constant"})


class _Layered(torch.nn.Module):
    """The piecewise-linear form as a torch module auto_LiRPA can bound: ReLU k's input is a sum of Linear maps of
    the flat input x and of the earlier ReLU outputs (no slicing or concatenation in the graph)."""

    def __init__(self, form: PiecewiseLinear) -> None:
        super().__init__()
        sizes = [form.n_inputs] + [len(b) for _, b in form.layers]
        self.blocks: list[list[torch.nn.Linear]] = []
        for w, b in [*form.layers, (form.out_w, form.out_b)]:
            parts: list[torch.nn.Linear] = []
            start = 0
            for j, size in enumerate(sizes):
                if start >= w.shape[1]:
                    break
                linear = torch.nn.Linear(size, w.shape[0], bias=j == 0)
                linear.weight.data = torch.as_tensor(w[:, start:start + size], dtype=torch.float32)
                if j == 0:
                    linear.bias.data = torch.as_tensor(b, dtype=torch.float32)
                parts.append(linear)
                start += size
            self.blocks.append(parts)
        self.linears = torch.nn.ModuleList([linear for parts in self.blocks for linear in parts])  # registered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [x]
        for parts in self.blocks[:-1]:
            z = parts[0](values[0])
            for j in range(1, len(parts)):
                z = z + parts[j](values[j])
            values.append(torch.relu(z))
        last = self.blocks[-1]
        y = last[0](values[0])
        for j in range(1, len(last)):
            y = y + last[j](values[j])
        return y


def crown_bounds(form: PiecewiseLinear, lower: np.ndarray, upper: np.ndarray, rows: np.ndarray):
    """CROWN through auto_LiRPA on the layered form: per ReLU layer (l, u) of its inputs, widened by a float32
    safety margin, and lower bounds of rows·y over the box."""
    from ..lirpa import bounded_input, bounded_module, relu_input_nodes

    module = _Layered(form).eval()
    lo = torch.as_tensor(lower, dtype=torch.float32).reshape(1, -1)  # flat: the layered form reads x flattened
    hi = torch.as_tensor(upper, dtype=torch.float32).reshape(1, -1)
    bounded = bounded_module(module, lo, {"conv_mode": "matrix"})  # no conv: patches mode only misleads it
    with torch.no_grad():
        lb, _ = bounded.compute_bounds(x=(bounded_input(lo, hi),), C=torch.as_tensor(rows, dtype=torch.float32)[None],
                                       method="CROWN", bound_upper=False)
    nodes = relu_input_nodes(bounded)
    pre = []
    for node in nodes:
        lo_k = node.lower.detach().double().reshape(-1).numpy()
        hi_k = node.upper.detach().double().reshape(-1).numpy()
        slack = 1e-5 * (1 + np.maximum(np.abs(lo_k), np.abs(hi_k)))  # float32 bounds of a float64 program
        pre.append((lo_k - slack, hi_k + slack))
    if len(pre) != len(form.layers) or any(len(p[0]) != len(b) for p, (_, b) in zip(pre, form.layers)):
        return None, None
    return pre, lb.detach().double().reshape(-1).numpy()


def interval_bounds(form: PiecewiseLinear, lower: np.ndarray, upper: np.ndarray, tighter=None):
    """Per ReLU layer the interval bounds (l, u) of its inputs over the box, and the bounds of every variable.

    `tighter`: other sound bounds per layer (CROWN's); each layer then uses the intersection, and the layers after
    it propagate from the tightened ReLU outputs."""
    v_lo, v_hi = lower.astype(np.float64).copy(), upper.astype(np.float64).copy()
    pre = []
    for k, (w, b) in enumerate(form.layers):
        mid, rad = (v_lo + v_hi) / 2, (v_hi - v_lo) / 2
        centre = w @ mid + b
        spread = np.abs(w) @ rad
        lo, hi = centre - spread, centre + spread
        if tighter is not None:
            lo, hi = np.maximum(lo, tighter[k][0]), np.minimum(hi, tighter[k][1])
        pre.append((lo, hi))
        v_lo, v_hi = np.concatenate([v_lo, np.maximum(lo, 0)]), np.concatenate([v_hi, np.maximum(hi, 0)])
    return pre, v_lo, v_hi


class SparseRows:
    """Linear constraints lo <= row·v <= hi collected row by row (COO triples), for scipy's solvers."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        self.lo: list[float] = []
        self.hi: list[float] = []

    def add(self, entries: list[tuple[int, float]], dense: np.ndarray | None, lo: float, hi: float) -> None:
        """One row: the sparse `entries` (column, value) plus the dense coefficients `dense` over columns 0…"""
        r = len(self.lo)
        if dense is not None:
            nz = np.flatnonzero(dense)
            self.rows.extend([r] * len(nz))
            self.cols.extend(nz.tolist())
            self.vals.extend(dense[nz].tolist())
        for c, value in entries:
            self.rows.append(r)
            self.cols.append(c)
            self.vals.append(value)
        self.lo.append(lo)
        self.hi.append(hi)

    def matrix(self, n_columns: int):
        from scipy.sparse import csr_matrix

        return csr_matrix((self.vals, (self.rows, self.cols)), shape=(len(self.lo), n_columns)) if self.lo else None


def lp_tighten(form: PiecewiseLinear, lower: np.ndarray, upper: np.ndarray, pre: list, deadline: float):
    """Tighter ReLU input bounds by linear programming (the LP relaxation of every earlier layer: exact for stable
    ReLUs, the triangle for unstable ones), layer by layer, for each neuron whose bounds straddle 0; later layers
    then propagate from the tightened ones. Each bound is an LP optimum widened by a safety slack (HiGHS's
    tolerances), so it stays sound; an LP that fails keeps the bound it had. Stops at `deadline` (perf_counter).
    Returns (pre, v_lo, v_hi) as `interval_bounds` does. Fewer unstable ReLUs = fewer binaries, and tighter big-M
    constants for the rest."""
    from scipy.optimize import linprog

    pre, v_lo, v_hi = interval_bounds(form, lower, upper, pre)
    pre = [(lo.copy(), hi.copy()) for lo, hi in pre]
    below, equal = SparseRows(), SparseRows()  # the relaxation of the layers before k: row·v <= hi, row·v = hi
    offset = form.n_inputs
    for k, (w, b) in enumerate(form.layers):
        lo_k, hi_k = pre[k]
        n = w.shape[1]  # the variables layer k reads: x and every earlier ReLU output
        open_rows = np.flatnonzero((lo_k < 0) & (hi_k > 0) & (k > 0))  # layer 0's intervals are exact already
        if len(open_rows):
            a_ub, a_eq = below.matrix(n), equal.matrix(n)
            var_bounds = np.stack([v_lo[:n], v_hi[:n]], axis=1)
            for i in open_rows.tolist():
                for sign in (1.0, -1.0):  # min z (sign 1), max z (sign -1)
                    if time.perf_counter() > deadline:
                        return interval_bounds(form, lower, upper, pre)
                    result = linprog(sign * w[i], A_ub=a_ub, b_ub=below.hi or None, A_eq=a_eq,
                                     b_eq=equal.hi or None, bounds=var_bounds, method="highs")
                    if result.status != 0:
                        continue
                    value = sign * result.fun + b[i]
                    slack = 1e-6 * (1 + abs(value))
                    if sign > 0:
                        lo_k[i] = max(lo_k[i], value - slack)
                    else:
                        hi_k[i] = min(hi_k[i], value + slack)
            pre, v_lo, v_hi = interval_bounds(form, lower, upper, pre)  # later layers from the tightened bounds
            pre = [(lo.copy(), hi.copy()) for lo, hi in pre]
            lo_k, hi_k = pre[k]
        for i in range(len(b)):  # layer k's final bounds join the relaxation the later layers are tightened over
            a = offset + i
            if hi_k[i] <= 0:
                continue  # a = 0 by its bounds
            if lo_k[i] >= 0:
                equal.add([(a, 1.0)], -w[i], b[i], b[i])  # a - z = 0
                continue
            below.add([(a, -1.0)], w[i], -np.inf, -b[i])  # z - a <= 0
            slope = hi_k[i] / (hi_k[i] - lo_k[i])  # a <= slope·(z - l)
            below.add([(a, 1.0)], -slope * w[i], -np.inf, slope * (b[i] - lo_k[i]))
        offset += len(b)
    return pre, v_lo, v_hi


@contextmanager
def _quiet_stdout():
    """Silence file descriptor 1 (C extensions write there, past sys.stdout) for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@dataclass
class MilpOutcome:
    """`unsat`, `sat` (x: a witness input, checked on the real network) or `unknown`, with the solver's seconds."""

    result: str
    x: np.ndarray | None = None
    seconds: float = 0.0
    detail: str = ""


def decide(form: PiecewiseLinear, prop: VnnlibProperty, model: torch.nn.Module, time_limit: float,
           binary_inputs: bool = False) -> MilpOutcome:
    """Decide the property over its input box; `binary_inputs`: only the box's corners count (hull witnesses)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix, vstack

    start = time.perf_counter()
    lower, upper = prop.lower.astype(np.float64), prop.upper.astype(np.float64)
    a_all, b_all, owner = prop.rows()
    crown_pre, row_lower = crown_bounds(form, lower, upper, a_all)
    pre, v_lo, v_hi = interval_bounds(form, lower, upper, crown_pre)  # per neuron the tighter of IBP and CROWN
    pre, v_lo, v_hi = lp_tighten(form, lower, upper, pre, start + LP_SHARE * time_limit)
    done = set()  # disjuncts CROWN already refutes: a row whose lower bound exceeds its b + margin
    if row_lower is not None:
        done = {d for i, d in enumerate(owner) if row_lower[i] - b_all[i] > UNSAT_MARGIN}
    n_v = form.n_variables
    unstable = [(k, int(i)) for k, (lo, hi) in enumerate(pre) for i in np.flatnonzero((lo < 0) & (hi > 0))]
    n_d = len(unstable)
    n_corner = int(np.sum(upper > lower)) if binary_inputs else 0
    n = n_v + n_d + n_corner + 1  # variables: v, δ, corner choices, t
    constraints = SparseRows()
    add = constraints.add

    delta_of = {key: n_v + j for j, key in enumerate(unstable)}
    offset = form.n_inputs
    for k, (w, b) in enumerate(form.layers):
        lo, hi = pre[k]
        for i in range(len(b)):
            a = offset + i
            if hi[i] <= 0:  # inactive: a = 0 (its bounds are [0, 0])
                continue
            if lo[i] >= 0:  # active: a = z
                add([(a, -1.0)], w[i], -b[i], -b[i])
                continue
            d = delta_of[(k, i)]
            add([(a, -1.0)], w[i], -np.inf, -b[i])                       # z - a <= 0
            add([(a, 1.0), (d, -hi[i])], None, -np.inf, 0.0)                   # a - u·δ <= 0
            add([(a, 1.0), (d, -lo[i])], -w[i], -np.inf, b[i] - lo[i])  # a - z + l·δ <= -l
        offset += len(b)
    if binary_inputs:  # x_i = lower_i + (upper_i - lower_i)·c_i, c_i binary
        for j, pixel in enumerate(np.flatnonzero(upper > lower).tolist()):
            add([(pixel, 1.0), (n_v + n_d + j, -(upper[pixel] - lower[pixel]))], None, lower[pixel], lower[pixel])
    base = constraints.matrix(n)
    bounds_lo = np.concatenate([v_lo, np.zeros(n_d + n_corner), [-np.inf]])
    # t <= UNSAT_MARGIN: every branch-and-bound node whose relaxation has min t above the margin is infeasible and
    # pruned at once (with t free, HiGHS must close the whole gap before it may stop); infeasible = refuted
    bounds_hi = np.concatenate([v_hi, np.ones(n_d + n_corner), [UNSAT_MARGIN]])
    integrality = np.concatenate([np.zeros(n_v), np.ones(n_d + n_corner), [0]])
    objective = np.zeros(n)
    objective[-1] = 1.0
    refuted, witness = True, None
    for index, (a_rows, b_rows) in enumerate(prop.disjuncts):
        if index in done:
            continue
        left = time_limit - (time.perf_counter() - start)
        if left <= 0:
            return MilpOutcome("unknown", seconds=time.perf_counter() - start, detail="time limit")
        coeff = a_rows @ form.out_w  # rows over v: A·y - b - t <= 0
        extra = coo_matrix(np.hstack([coeff, np.zeros((len(b_rows), n_d + n_corner)), -np.ones((len(b_rows), 1))]))
        matrix = extra if base is None else vstack([base, extra])
        c_lo = np.concatenate([constraints.lo, np.full(len(b_rows), -np.inf)])
        c_hi = np.concatenate([constraints.hi, b_rows - a_rows @ form.out_b])
        with _quiet_stdout():  # HiGHS prints solver chatter on the C-level stdout
            result = milp(objective, integrality=integrality, bounds=Bounds(bounds_lo, bounds_hi),
                          constraints=LinearConstraint(matrix, c_lo, c_hi), options={"time_limit": max(left, 0.01)})
        if result.status == MILP_INFEASIBLE:
            continue  # no point of the box has t <= UNSAT_MARGIN: this disjunct cannot be met anywhere in it
        dual = getattr(result, "mip_dual_bound", None)
        if dual is not None and np.isfinite(dual) and dual > UNSAT_MARGIN:
            continue  # the same proof, where HiGHS stopped before calling the program infeasible
        refuted = False
        if result.x is not None and result.fun is not None and result.fun <= 0:
            x = result.x[:form.n_inputs]
            x = np.clip(x, lower, upper).astype(np.float32)
            with torch.no_grad():
                y = model(torch.from_numpy(x).reshape(1, *getattr(model, "input_shape", (len(x),))[1:]))
            if prop.output_holds(y.reshape(-1).double().numpy()) and prop.input_inside(x):
                witness = x
                break
    seconds = time.perf_counter() - start
    if witness is not None:
        return MilpOutcome("sat", witness, seconds, "witness checked on the network")
    if refuted:
        return MilpOutcome("unsat", None, seconds, f"{n_d} unstable ReLUs, {len(done)} disjuncts by CROWN")
    return MilpOutcome("unknown", None, seconds, "no proof and no checked witness")
