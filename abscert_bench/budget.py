"""Time and memory as first-class limits of bound computations (abscert-sound, crown, alpha-crown, ibp).

auto_LiRPA computes CROWN bounds layer by layer, one backward pass per layer whose bounds it needs. `guarded`
wraps a BoundedModule so every such pass first checks two limits and raises instead of going on:

* a **deadline** (`BoundTimeout`): the sample's time is up, so it is `unknown`, never a stopped run;
* a **memory budget** (`OutOfMemoryBudget`): a sampler thread watches the process's resident memory (on
  CUDA, the allocator's peak) while a bound runs and flags it once the growth since the call began passes
  the budget; the next layer boundary raises. A genuine allocation failure counts the same.

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

T = TypeVar("T")
R = TypeVar("R")
SAMPLE_EVERY_S = 0.005
_CUDA_OPEN = [0]  # CUDA watches open now: only the outermost resets the allocator's peak
HEADROOM = 1.25  # planned batch: estimate × HEADROOM must fit the budget
DEFAULT_MEMORY_MB = 4096.0  # memory budget of one bound call (MiB), for every verifier that takes one


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

    def check(self) -> None:
        now = time.perf_counter()
        for deadline, watch in self.active:
            if deadline is not None and now > deadline:
                raise BoundTimeout("bound deadline passed")
            watch.poll()
            if watch.exceeded:
                raise OutOfMemoryBudget(f"bound memory passed {watch.budget_mb:.0f} MiB")


def guarded(bounded) -> Limits:
    """Make `bounded` (an auto_LiRPA BoundedModule) check a `Limits` before every backward, IBP and forward pass
    and before every node's backward step (so a pass through a wide network stops within one layer).

    The wrappers are instance attributes, so only this module is affected. Returns its Limits (one per module).
    """
    limits = getattr(bounded, "_abscert_limits", None)
    if limits is not None:
        return limits
    limits = Limits()
    targets = [(bounded, name) for name in ("backward_general", "IBP_general", "forward_general")]
    targets += [(node, "bound_backward") for node in bounded._modules.values() if hasattr(node, "bound_backward")]
    for owner, name in targets:
        original = getattr(owner, name)

        def check_first(*args, _original=original, **kwargs):
            limits.check()
            return _original(*args, **kwargs)

        object.__setattr__(owner, name, check_first)
    object.__setattr__(bounded, "_abscert_limits", limits)
    return limits


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
