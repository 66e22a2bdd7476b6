"""Time and memory as first-class limits of bound computations (abscert-sound, crown, alpha-crown, ibp).

auto_LiRPA computes CROWN bounds layer by layer, one backward pass per layer whose bounds it needs. `guarded`
wraps a BoundedModule so every such pass first checks two limits and raises instead of going on:

* a **deadline** (`BoundTimeout`): the sample's time is up, so it is `unknown`, never a stopped run;
* a **memory budget** (`OutOfMemoryBudget`): a sampler thread watches the process's resident memory (on
  CUDA, the allocator's peak) while a bound runs and flags it once the growth since the call began passes
  the budget; the next layer boundary raises. A genuine allocation failure counts the same.

The memory limit also looks one step ahead: before a node's backward step, `backward_step_mb` estimates the
memory the step will allocate (the A matrix it returns, from the incoming A's shape and the node's weight;
within ~12 % of the measured growth on the large steps of DM_Medium / DM_Large CROWN), and the guard refuses the
step when it would take the growth past the budget. One CROWN step on DM_Large allocates up to ~3.5 GB, so
without the look-ahead the budget was overshot by a whole step. (The deadline is checked between steps only: a
step that starts in time may end past it.)

`BatchPlanner` turns the measured peak growth per sample into batch sizes: it starts from one sample,
learns how much memory one sample's bound takes, and never plans a batch whose estimate exceeds the budget;
a call that still runs out is retried on halves, and a single sample that does not fit is reported to the
caller (which then uses a cheaper method or answers `unknown`).
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch

from .errors import UserError

T = TypeVar("T")
R = TypeVar("R")
SAMPLE_EVERY_S = 0.005
_CUDA_OPEN = [0]  # CUDA watches open now: only the outermost resets the allocator's peak
HEADROOM = 1.25  # planned batch: estimate × HEADROOM must fit the budget
DEFAULT_MEMORY_MB = 4096.0  # memory budget of one bound call (MiB), for every verifier that takes one


def crown_batch_opts(name: str, crown_batch) -> dict:
    """auto_LiRPA options for a verifier's `crown_batch` (0: off; N > 0: batched CROWN, an intermediate layer's
    unstable neurons N at a time: the same bounds with one N-th of the step memory). Bad values: UserError."""
    if isinstance(crown_batch, bool) or not isinstance(crown_batch, int) or crown_batch < 0:
        raise UserError(f"{name}: crown_batch must be an integer >= 0, got {crown_batch!r}")
    return {"crown_batch_size": crown_batch} if crown_batch else {}


class BoundTimeout(Exception):
    """A bound computation passed its deadline."""


class OutOfMemoryBudget(Exception):
    """A bound computation passed its memory budget."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception is an allocation failure (CPU MemoryError, CUDA OOM, allocator RuntimeError)."""
    if isinstance(error, (MemoryError, OutOfMemoryBudget)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "not enough memory" in text
                                                or "can't allocate memory" in text)


def out_of_budget(error: BaseException) -> bool:
    """Whether an exception means a bound ran out of time or memory (the sample is then `unknown`)."""
    return isinstance(error, BoundTimeout) or is_out_of_memory(error)


_PROCESS: list = []


def budget_stage(error: BaseException) -> str:
    """The `unknown` stage name for a time or memory limit: 'timeout' or 'memory'."""
    return "timeout" if isinstance(error, BoundTimeout) else "memory"


def within_budget(fn: Callable[[], T]) -> T | BaseException:
    """fn()'s result, or the exception when it ran out of time or memory (any other error propagates)."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - only time and memory limits are answers
        if not out_of_budget(error):
            raise
        return _without_frames(error)


def _without_frames(error: BaseException) -> BaseException:
    """The error without its tracebacks (its own and its context's): a kept traceback keeps every frame of the
    stopped bound alive, with its A matrices (GBs on DM_Large), while the caller goes on to a cheaper bound."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__traceback__ = None
        link = link.__cause__ or link.__context__
    return error


def _rss_mb() -> float:
    if not _PROCESS:
        import psutil

        _PROCESS.append(psutil.Process())
    return _PROCESS[0].memory_info().rss / 2**20


class MemoryWatch:
    """Peak memory growth (MiB) during a `with` block, on the CPU (resident set) or a CUDA device."""

    def __init__(self, device: torch.device | str = "cpu", budget_mb: float | None = None) -> None:
        self.device = torch.device(device)
        self.budget_mb = budget_mb
        self.peak_mb = 0.0
        self.exceeded = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = 0.0

    def _growth(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self._base
        return _rss_mb() - self._base

    def growth_now(self) -> float:
        """The memory growth now (on CUDA the allocated memory, not the peak), read directly."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20 - self._base
        return _rss_mb() - self._base

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self._note(self._growth())

    def poll(self) -> None:
        """Read the memory now where that is cheap (a CUDA counter; on the CPU the sampler thread does it)."""
        if self.device.type == "cuda":
            self._note(self._growth())

    def _note(self, growth: float) -> None:
        self.peak_mb = max(self.peak_mb, growth)
        if self.budget_mb is not None and growth > self.budget_mb:
            self.exceeded = True

    def __enter__(self) -> MemoryWatch:
        if self.device.type == "cuda":
            if _CUDA_OPEN[0] == 0:  # an inner watch keeps the outer one's peak (it may overestimate: safe)
                torch.cuda.reset_peak_memory_stats(self.device)
            _CUDA_OPEN[0] += 1
            self._base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self._base = _rss_mb()
            self._note(self._growth())
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._note(self._growth())
        if self.device.type == "cuda":
            _CUDA_OPEN[0] -= 1


class Limits:
    """The limits a guarded BoundedModule checks at each layer: the deadlines and memory watches of every
    `limited` block now open on it (blocks nest: the inner one adds its limits to the outer one's)."""

    def __init__(self) -> None:
        self.active: list[tuple[float | None, MemoryWatch]] = []

    def check(self, step_mb: float = 0.0) -> None:
        """Raise if a deadline has passed, a budget was passed, or the next step (`step_mb` of new memory, an
        estimate made before the step allocates it) would take the growth past a budget."""
        now = time.perf_counter()
        for deadline, watch in self.active:
            if deadline is not None and now > deadline:
                raise BoundTimeout("bound deadline passed")
            watch.poll()
            if watch.exceeded:
                raise OutOfMemoryBudget(f"bound memory passed {watch.budget_mb:.0f} MiB")
            if step_mb > 0 and watch.budget_mb is not None and watch.growth_now() + step_mb > watch.budget_mb:
                raise OutOfMemoryBudget(f"the next backward step needs ~{step_mb:.0f} MiB: past the "
                                        f"{watch.budget_mb:.0f} MiB budget")


def guarded(bounded) -> Limits:
    """Make `bounded` (an auto_LiRPA BoundedModule) check a `Limits` before every backward, IBP and forward pass
    and before every node's backward step (so a pass through a wide network stops within one layer).

    The wrappers are instance attributes, so only this module is affected. Returns its Limits (one per module).
    """
    limits = getattr(bounded, "_abscert_limits", None)
    if limits is not None:
        return limits
    limits = Limits()
    for name in ("backward_general", "IBP_general", "forward_general"):
        _check_before(bounded, name, limits, None)
    _drop_partial_matrices_on_stop(bounded)
    for node in bounded._modules.values():
        if hasattr(node, "bound_backward"):
            _check_before(node, "bound_backward", limits, node)
    object.__setattr__(bounded, "_abscert_limits", limits)
    return limits


def _check_before(owner, name: str, limits: Limits, node) -> None:
    """Wrap `owner.name` so it checks `limits` first; for a node's backward step, with the step's memory estimate."""
    original = getattr(owner, name)

    def check_first(*args, **kwargs):
        if node is None or len(args) < 2:
            limits.check()
            return original(*args, **kwargs)
        limits.check(backward_step_mb(node, args[0], args[1]))
        return original(*args, **kwargs)

    object.__setattr__(owner, name, check_first)


def _drop_partial_matrices_on_stop(bounded) -> None:
    """A backward pass stopped half-way (a limit, an allocation failure) leaves the A matrices it had reached on
    the nodes (GBs on DM_Large): drop them, so the next call starts from the memory it would have had."""
    original = bounded.backward_general

    def backward_general(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except BaseException:
            for node in bounded._modules.values():
                if getattr(node, "lA", None) is not None or getattr(node, "uA", None) is not None:
                    node.lA = node.uA = None
            raise

    object.__setattr__(bounded, "backward_general", backward_general)


# Node types whose backward step only renames the A matrix (a view: no new memory).
VIEW_NODES = frozenset({"BoundFlatten", "BoundReshape", "BoundUnsqueeze", "BoundSqueeze", "BoundInput",
                        "BoundParams", "BoundBuffers"})
# Node types whose backward step multiplies the A matrix by a weight (the input A is copied, the output is new).
WEIGHT_NODES = frozenset({"BoundConv", "BoundLinear", "BoundMatMul"})

# New memory of an elementwise step (ReLU relaxation, BatchNorm, Add) per input-A element, measured on DM_Medium /
# DM_Large CROWN: dense A matrices make ~3.5 temporaries (clamps, products, bias terms), Patches about one.
ELEMENTWISE, ELEMENTWISE_PATCHES = 3.5, 1.1


def _spec_and_size(a) -> tuple[int, int]:
    """(number of specifications × batch, numel held) of a backward-pass A: a tensor, Patches, eyeC or OneHotC."""
    patches = getattr(a, "patches", None)
    if isinstance(a, torch.Tensor):
        return int(a.shape[0]) * int(a.shape[1]), a.numel()
    if patches is not None:  # Patches: (out_c, batch, out_h, out_w, c, kh, kw) or (unstable, batch, c, kh, kw)
        return math.prod(patches.shape[:-3]), patches.numel()
    shape = getattr(a, "shape", None)
    if shape is None or len(shape) < 2:
        return 0, 0
    spec = int(shape[0]) * int(shape[1])
    if type(a).__name__ == "Patches":  # identity patches, nothing materialised: (out_c, batch, out_h, out_w, …),
        # or batched CROWN's sparse ones over selected neurons: (unstable, batch, c, 1, 1)
        return math.prod(int(v) for v in shape[:2 if len(shape) == 5 else 4]), 0
    return spec, 0  # eyeC / OneHotC: an implicit identity


def _output_numel(node, a, spec: int, held: int) -> int:
    """The numel of the A matrix `node`'s backward step produces from `a` (per side)."""
    kind = type(node).__name__
    if kind not in WEIGHT_NODES:  # elementwise (ReLU's relaxation): temporaries of the input's size
        return math.ceil(held * (ELEMENTWISE_PATCHES if getattr(a, "patches", None) is not None else ELEMENTWISE))
    inputs = getattr(node, "inputs", None) or []
    shape = getattr(inputs[0], "output_shape", None) if inputs else None
    if shape is None:
        return held
    dense = spec * math.prod(int(v) for v in shape[1:])  # a matrix over the whole input of the node
    patches = getattr(a, "patches", None)
    weight = getattr(inputs[1], "lower", None) if kind == "BoundConv" and len(inputs) > 1 else None
    if type(a).__name__ == "Patches" and patches is None and weight is not None and weight.dim() == 4:
        return spec * int(weight.shape[1]) * int(weight.shape[2]) * int(weight.shape[3])  # identity: the weight
    if patches is not None and weight is not None and weight.dim() == 4 and len(shape) == 4:
        stride = getattr(node, "stride", (1, 1))
        kh = (int(patches.shape[-2]) - 1) * int(stride[0]) + int(weight.shape[2])
        kw = (int(patches.shape[-1]) - 1) * int(stride[1]) + int(weight.shape[3])
        if kw <= int(shape[-1]):  # the patches stay patches (auto_LiRPA turns them into a matrix once wider)
            return spec * int(weight.shape[1]) * kh * kw
    return dense


def backward_step_mb(node, last_lA, last_uA) -> float:
    """Estimate (MiB) of the new memory auto_LiRPA's backward step through `node` allocates: per side, the
    output A (and, through a weight, a copy of the input A); float32. Views cost nothing."""
    if node is None or type(node).__name__ in VIEW_NODES:
        return 0.0
    total = 0
    for a in (last_lA, last_uA):
        if a is None:
            continue
        spec, held = _spec_and_size(a)
        out = _output_numel(node, a, spec, held)
        total += out + (held if type(node).__name__ in WEIGHT_NODES else 0)
    return total * 4 / 2**20


@contextmanager
def limited(limits: Limits, deadline: float | None = None, budget_mb: float | None = None,
            device: torch.device | str = "cpu") -> Iterator[MemoryWatch]:
    """Within the block, `limits` enforce the deadline and the memory budget; yields the block's MemoryWatch."""
    watch = MemoryWatch(device, budget_mb)
    limits.active.append((deadline, watch))
    try:
        with watch:
            yield watch
    finally:
        limits.active.pop()


class BatchPlanner:
    """Batch sizes from a memory budget, learnt from the peak growth of the calls it runs.

    One planner per guarded BoundedModule (`limits`). Every `call` runs inside `limited(limits, deadline,
    budget)`, and its peak growth teaches the planner the memory one item takes; `chunks` runs a function
    over planned chunks of a list, retrying smaller after an allocation failure or a budget overrun.
    """

    def __init__(self, budget_mb: float, limits: Limits, device: torch.device | str = "cpu") -> None:
        if not budget_mb > 0:
            raise ValueError(f"memory budget must be > 0 MiB, got {budget_mb}")
        self.budget_mb = float(budget_mb)
        self.limits = limits
        self.device = device
        self.per_item_mb: float | None = None  # the largest peak growth per item seen so far

    def size(self, wanted: int) -> int:
        """How many items the next call may take (1 until a measurement exists)."""
        if self.per_item_mb is None:
            return 1
        fit = int(self.budget_mb / max(self.per_item_mb * HEADROOM, 1e-6))
        return max(1, min(wanted, fit))

    def record(self, peak_mb: float, items: int) -> None:
        """Learn from one call: `peak_mb` of growth for `items` items."""
        per = max(peak_mb, 0.0) / max(1, items)
        self.per_item_mb = per if self.per_item_mb is None else max(self.per_item_mb, per)

    def shrink(self, failed: int) -> None:
        """A call of `failed` items ran out: plan at most half as many from now on."""
        self.per_item_mb = max(self.per_item_mb or 0.0, self.budget_mb / (HEADROOM * math.ceil(failed / 2)))

    def call(self, fn: Callable[[], T], items: int = 1, deadline: float | None = None) -> T:
        """Run one bound call for `items` items under the limits and learn its memory."""
        with limited(self.limits, deadline, self.budget_mb, self.device) as watch:
            try:
                return fn()
            finally:  # a stopped call still teaches how much memory it had taken
                self.record(watch.peak_mb, items)

    def chunks(self, fn: Callable[[Sequence[T]], R], items: Sequence[T], max_batch: int,
               deadline: Callable[[Sequence[T]], float | None] | None = None,
               ) -> Iterator[tuple[Sequence[T], R | BaseException]]:
        """Run `fn(chunk)` over consecutive planned chunks of `items`; yields (chunk, result).

        A chunk of several items that runs out of memory is retried smaller; when a single item runs out, or a
        chunk passes `deadline(chunk)`, the result yielded is the exception (BoundTimeout, OutOfMemoryBudget or
        the allocation error), for the caller to answer `unknown`. Stopping the iteration early is fine.
        """
        position = 0
        while position < len(items):
            chunk = items[position:position + self.size(max_batch)]
            # both lambdas run at once, inside this iteration (within_budget and call invoke them before returning)
            result = within_budget(lambda: self.call(lambda: fn(chunk), len(chunk),  # noqa: B023
                                                     deadline(chunk) if deadline else None))  # noqa: B023
            if isinstance(result, BaseException) and is_out_of_memory(result) and len(chunk) > 1:
                self.shrink(len(chunk))
                continue
            position += len(chunk)
            yield chunk, result
