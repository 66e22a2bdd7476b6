"""Per-stage time and memory caps, and peak-memory measurement, for cells running in any thread.

Signals only reach the main thread, and Dask runs tasks in worker threads, so a cap is enforced by a monitor
thread that raises `CapExceeded` inside the stage's thread (CPython's PyThreadState_SetAsyncExc). The exception
arrives at the next Python bytecode, i.e. between torch operations: a stage stops within one operation of its cap.
Memory is the resident set size (RSS) of the process above its value when the stage began, sampled every
`interval` seconds; on CUDA the peak of torch.cuda.max_memory_allocated is reported as well. Sampling can miss a
single allocation of many GB (CROWN's bound matrices on a large network), so with a memory cap the stage also
runs under an address-space limit (RLIMIT_AS) of the process's size at the start plus the cap: such an
allocation then fails inside the stage ("can't allocate memory") and is recorded as out of memory, instead of
the operating system or a Dask nanny killing the whole process.
"""
from __future__ import annotations

import ctypes
import os
import resource
import threading
import time
from typing import Any

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class CapExceeded(Exception):
    """Raised inside a stage that went over its time or memory cap."""


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * PAGE_SIZE / 2**20
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def virtual_mb() -> float | None:
    """Current virtual size (address space) of this process in MiB, or None where /proc is missing."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[0]) * PAGE_SIZE / 2**20
    except (OSError, IndexError, ValueError):
        return None


class AddressSpaceLimit:
    """Context manager: lower the soft RLIMIT_AS to (current virtual size + `extra_mb`), restore it after."""

    def __init__(self, extra_mb: float) -> None:
        self.extra_mb = extra_mb
        self._previous: tuple[int, int] | None = None

    def __enter__(self) -> AddressSpaceLimit:
        size = virtual_mb()
        if not self.extra_mb or size is None:
            return self
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = int((size + self.extra_mb) * 2**20)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        if soft == resource.RLIM_INFINITY or limit < soft:
            try:
                resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
                self._previous = (soft, hard)
            except (ValueError, OSError):
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            resource.setrlimit(resource.RLIMIT_AS, self._previous)


def _raise_in(thread_id: int, exc_type: type[BaseException] | None) -> None:
    target = ctypes.py_object(exc_type) if exc_type is not None else None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), target)


class StageGuard:
    """Context manager: measures a stage's wall time and peak memory, stops it at its caps (0 = no cap).

    After the block, `stopped` holds the reason ("over the time cap of 60 s", "out of memory …") or None.
    A `CapExceeded` raised by the guard, and torch's / Python's out-of-memory errors, are swallowed and
    recorded; any other exception propagates.
    """

    def __init__(self, time_cap_s: float = 0.0, memory_cap_mb: float = 0.0, device: str = "cpu",
                 interval: float = 0.02) -> None:
        self.time_cap_s = float(time_cap_s or 0.0)
        self.memory_cap_mb = float(memory_cap_mb or 0.0)
        self.cuda = device.startswith("cuda")
        self.interval = interval
        self.stopped: str | None = None
        self.seconds = 0.0
        self.peak_rss_mb = 0.0
        self.cuda_peak_mb: float | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._fired = False
        self._active = False

    def __enter__(self) -> StageGuard:
        self._thread_id = threading.get_ident()
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._start_rss = rss_mb()
        self._address_limit = AddressSpaceLimit(self.memory_cap_mb if not self.cuda else 0.0).__enter__()
        self._start = time.perf_counter()
        self._active = True
        self._monitor = threading.Thread(target=self._watch, name="abscert-stage-guard", daemon=True)
        self._monitor.start()
        return self

    def _watch(self) -> None:
        while not self._done.wait(self.interval):
            self._sample()
            reason = None
            if self.time_cap_s and time.perf_counter() - self._start > self.time_cap_s:
                reason = f"over the time cap of {self.time_cap_s:g} s"
            elif self.memory_cap_mb and self.peak_rss_mb > self.memory_cap_mb:
                reason = f"out of memory (over the cap of {self.memory_cap_mb:g} MiB)"
            if reason is not None:
                with self._lock:
                    if self._active:
                        self.stopped = reason
                        self._fired = True
                        _raise_in(self._thread_id, CapExceeded)
                return

    def _sample(self) -> None:
        self.peak_rss_mb = max(self.peak_rss_mb, rss_mb() - self._start_rss)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        with self._lock:
            self._active = False
            if self._fired and exc_type is not CapExceeded:
                _raise_in(self._thread_id, None)  # cancel an exception scheduled but not yet raised
        self._done.set()
        self._monitor.join()
        self._address_limit.__exit__(None, None, None)
        self._sample()
        self.seconds = time.perf_counter() - self._start
        if self.cuda:
            import torch

            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20
        if exc_type is CapExceeded:
            self.stopped = self.stopped or "over a cap"
            return True
        if exc_type is not None and _is_out_of_memory(exc):
            self.stopped = f"out of memory ({type(exc).__name__})"
            return True
        return False

    def report(self) -> dict[str, Any]:
        """Seconds, peak memory above the stage's start (MiB) and the stop reason, for result.json."""
        out: dict[str, Any] = {"seconds": self.seconds, "peak_rss_mb": round(self.peak_rss_mb, 1)}
        if self.cuda_peak_mb is not None:
            out["cuda_peak_mb"] = round(self.cuda_peak_mb, 1)
        if self.stopped:
            out["stopped"] = self.stopped
        return out


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except AttributeError:
        pass
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(text in message for text in ("out of memory", "can't allocate memory",
                                                                             "cannot allocate memory"))
