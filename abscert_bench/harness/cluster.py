"""Dask glue: a LocalCluster of single-threaded worker processes (`--workers N`) or an existing scheduler.

Workers run `run_cell`, which commits each cell into the store itself, so the store must be on a filesystem
every worker sees (always true for a LocalCluster; for Slurm/PBS through dask-jobqueue, use a shared path).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from ..errors import UserError
from .cost import estimate_cell_cost
from .execute import run_cell
from .spec import Cell, training_key
from .store import Store

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _warm_worker(count: int, datasets: list[tuple[str, str | None]]) -> int:
    """Set the worker's torch threads and pay the one-off costs of every process (imports, the optimizer's first
    step, which imports torch._dynamo, loading the datasets) on all workers at once, before any cell."""
    import torch

    from .execute import _load, warm_process

    torch.set_num_threads(count)
    warm_process()
    for name, root in datasets:
        try:
            _load(name, root)
        except UserError:
            pass  # missing data: the cells record it
    return torch.get_num_threads()


def longest_first(cells: list[Cell]) -> list[Cell]:
    """The cells by decreasing estimated cost (ties keep the spec's order): LPT list scheduling."""
    costs = {cell.id: estimate_cell_cost(cell.params) for cell in cells}
    return sorted(cells, key=lambda cell: -costs[cell.id])


def make_client(workers: int | None = None, scheduler: str | None = None, torch_threads: int = 1,
                datasets: list[tuple[str, str | None]] | None = None):
    """A distributed.Client on a new LocalCluster (processes, 1 thread each) or on `scheduler`, workers warmed."""
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError:
        raise UserError("--workers / --scheduler need Dask: pip install dask distributed") from None
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise UserError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
        client.run(_warm_worker, torch_threads, datasets or [])  # workers that join later warm up in a cell
        return client, None
    env = {name: str(torch_threads) for name in THREAD_ENV}
    # A cell that kills its worker (out of memory, say) is recorded failed at once rather than retried on the
    # other workers: the next `run` retries it, after the user has seen why. (Read when the scheduler starts.)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR, env=env)
    client = Client(cluster)
    client.run(_warm_worker, torch_threads, datasets or [])
    return client, cluster


def run_on_dask(cells: list[Cell], store_root: str, data_root: str | None,
                finished: Callable[[str, dict[str, Any]], None], workers: int | None = None,
                scheduler: str | None = None, torch_threads: int = 1, store: Store | None = None) -> float:
    """Submit every cell, report each as it completes (a task that dies outside run_cell is recorded failed);
    returns the seconds from the first submission to the last completion."""
    from distributed import as_completed

    from .suite import failure_result

    # auto_LiRPA configures the root logger at INFO: keep Dask's chatter (start/stop, slow worker exits) quiet.
    quiet = {name: logging.getLogger(name) for name in ("distributed", "tornado", "bokeh")}
    levels = {name: log.level for name, log in quiet.items()}
    for log in quiet.values():
        log.setLevel(logging.ERROR)
    client = cluster = None
    try:
        datasets = sorted({(c["dataset"], data_root or c["data_root"]) for c in cells}, key=str)
        client, cluster = make_client(workers, scheduler, torch_threads, datasets)
        start = time.perf_counter()
        futures = {}
        # Submitted longest first (an idle worker takes a task as soon as it arrives), and with a decreasing
        # priority so that Dask keeps that order for the tasks still queued.
        # Cells that share a trained model (natural training at several eps) wait for the first of them, which
        # trains it; they then reuse it instead of training it again at the same time.
        leaders: dict[str, Any] = {}
        for rank, cell in enumerate(longest_first(cells)):
            priority = len(cells) - rank
            key, _ = training_key(cell.id, cell.params)
            after = leaders.get(key) if key != cell.id else None
            future = client.submit(run_cell, cell.params, cell.id, store_root, data_root, torch_threads,
                                   after=after, key=f"abscert-cell-{cell.id}-{os.getpid()}", pure=False,
                                   retries=0, priority=priority)
            leaders.setdefault(key, future)
            futures[future] = cell
        for future in as_completed(futures):
            cell = futures.pop(future)
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001  e.g. KilledWorker: the worker process died mid-cell
                result = (store or Store(store_root)).record(cell.id, failure_result(cell.id, cell.params, exc))
            # Let go of the finished task at once: Dask recomputes a task whose result lived on a worker that
            # dies later, and a cell is committed in the store, not held in worker memory.
            future.release()
            finished(cell.id, result)
        return time.perf_counter() - start
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        for name, log in quiet.items():
            log.setLevel(levels[name])
