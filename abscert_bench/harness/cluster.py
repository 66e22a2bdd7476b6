"""Dask glue: a LocalCluster of single-threaded worker processes (`--workers N`) or an existing scheduler.

Workers run `run_cell`, which commits each cell into the store itself, so the store must be on a filesystem
every worker sees (always true for a LocalCluster; for Slurm/PBS through dask-jobqueue, use a shared path):
`check_shared_store` proves it before the first cell, and the client reads every cell back from the store.
"""
from __future__ import annotations

import hashlib
import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import UserError
from .cost import estimate_cell_cost
from .execute import run_cell
from .lease import new_attempt_id
from .spec import Cell, training_key
from .store import Store

MAX_RESUBMITS = 3  # per cell, for tasks lost before they started (their worker died with them queued)

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


def _probe_reply(probe: str, address: str) -> Path:
    return Path(f"{probe}.{hashlib.sha1(address.encode()).hexdigest()[:12]}")


def _probe_store(probe: str, token: str, dask_worker: Any = None) -> tuple[str, str | None]:
    """On a worker (client.run): read the client's token file, answer with a file of its own; (host, what went
    wrong)."""
    host = socket.gethostname()
    try:
        seen = Path(probe).read_text()
    except OSError as exc:
        return host, f"cannot read {probe} ({type(exc).__name__}: {exc.strerror or exc})"
    if seen != token:
        return host, f"{probe} holds another token (a different file at the same path)"
    try:
        _probe_reply(probe, dask_worker.address).write_text(token)
    except OSError as exc:
        return host, f"cannot write next to {probe} ({type(exc).__name__}: {exc.strerror or exc})"
    return host, None


def check_shared_store(client: Any, store: Store) -> int:
    """Refuse (UserError) unless every worker of `client` reads a token the client wrote into the store and the
    client reads the answer each worker wrote back; returns the number of workers checked."""
    token = uuid.uuid4().hex
    store.staging_dir.mkdir(parents=True, exist_ok=True)
    probe = store.staging_dir / f"shared-check.{token}"
    probe.write_text(token)
    try:
        answers = client.run(_probe_store, str(probe), token)
        problems = []
        for address, (host, error) in sorted(answers.items()):
            if error is None and not _probe_reply(str(probe), address).exists():
                error = f"its answer written next to {probe} is not visible to this client"
            if error is not None:
                problems.append(f"worker {address} on {host}: {error}")
    finally:
        for path in store.staging_dir.glob(f"shared-check.{token}*"):
            path.unlink(missing_ok=True)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{len(problems)} of {len(answers)} Dask worker(s) do not see the results store "
                        f"{store.root}: {problems[0]}{more}; the store (--out) must be on a filesystem every worker "
                        "sees, at the same path; no cell was run")
    return len(answers)


def make_client(workers: int | None = None, scheduler: str | None = None, torch_threads: int = 1,
                datasets: list[tuple[str, str | None]] | None = None, store: Store | None = None,
                wait_s: float = 60.0):
    """A distributed.Client on a new LocalCluster (processes, 1 thread each) or on `scheduler`, workers warmed;
    with `store`, every worker is checked to see it (check_shared_store) before anything runs."""
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
        try:
            client.wait_for_workers(1, timeout=wait_s)
        except TimeoutError:
            client.close()
            raise UserError(f"the Dask scheduler at {scheduler} has no workers (waited {wait_s:g} s)") from None
        try:
            if store is not None:
                check_shared_store(client, store)
            client.run(_warm_worker, torch_threads, datasets or [])  # workers that join later warm up in a cell
        except BaseException:
            client.close()
            raise
        return client, None
    env = {name: str(torch_threads) for name in THREAD_ENV}
    # A cell that kills its worker (out of memory, say) is recorded failed at once rather than retried on the
    # other workers: the next `run` retries it, after the user has seen why. (Read when the scheduler starts.)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR, env=env)
    client = Client(cluster)
    try:
        if store is not None:
            check_shared_store(client, store)
        client.run(_warm_worker, torch_threads, datasets or [])
    except BaseException:
        client.close()
        cluster.close()
        raise
    return client, cluster


def attempt_started(store: Store, cell_id: str, submission: str) -> bool:
    """Whether the task submitted as `submission` got as far as owning its cell (run_cell logs that line)."""
    try:
        return f"(submission {submission}) on " in store.log_path(cell_id).read_text()
    except OSError:
        return False


def checked_result(store: Store, cell: Cell, result: dict[str, Any]) -> dict[str, Any]:
    """What the store holds for a cell a worker reported on: a status is reported only for a cell that is there."""
    stored = store.result(cell.id)
    if stored is not None:
        return stored
    if result.get("store_missing"):
        error = f"the worker did not see the store: {result.get('error')}"
    else:
        error = (f"the worker on {result.get('host', '?')} (pid {result.get('pid', '?')}) reported "
                 f"{result.get('status')!r} but no result is in the store {store.root} (not a shared filesystem?)")
    return store.record(cell.id, {"id": cell.id, "cell": cell.params, "status": "failed", "stages": {},
                                  "error": error})


def run_on_dask(cells: list[Cell], store_root: str, data_root: str | None,
                finished: Callable[[str, dict[str, Any]], None], workers: int | None = None,
                scheduler: str | None = None, torch_threads: int = 1, store: Store | None = None,
                cleaned: list[str] | None = None) -> float:
    """Submit every cell, report each as it completes (a task that dies running is recorded failed, one lost
    before it started is submitted again); returns the seconds from the first submission to the last completion.
    `cleaned` receives the names of the staging entries of dead attempts removed at the end."""
    from .suite import failure_result

    # auto_LiRPA configures the root logger at INFO: keep Dask's chatter (start/stop, slow worker exits) quiet.
    quiet = {name: logging.getLogger(name) for name in ("distributed", "tornado", "bokeh")}
    levels = {name: log.level for name, log in quiet.items()}
    for log in quiet.values():
        log.setLevel(logging.ERROR)
    client = cluster = None
    store = store or Store(store_root)
    try:
        datasets = sorted({(c["dataset"], data_root or c["data_root"]) for c in cells}, key=str)
        client, cluster = make_client(workers, scheduler, torch_threads, datasets, store=store)
        start = time.perf_counter()
        futures: dict[Any, tuple[Cell, str, int]] = {}
        resubmits = dict.fromkeys((cell.id for cell in cells), 0)
        # Submitted longest first (an idle worker takes a task as soon as it arrives), and with a decreasing
        # priority so that Dask keeps that order for the tasks still queued.
        # Cells that share a trained model (natural training at several eps) wait for the first of them, which
        # trains it; they then reuse it instead of training it again at the same time.
        leaders: dict[str, Any] = {}

        def submit(cell: Cell, priority: int) -> Any:
            key, _ = training_key(cell.id, cell.params)
            leader = leaders.get(key)
            after = leader if key != cell.id and leader is not None and leader in futures else None
            submission = new_attempt_id()
            future = client.submit(run_cell, cell.params, cell.id, store_root, data_root, torch_threads,
                                   after=after, submission=submission, key=f"abscert-cell-{cell.id}-{submission}",
                                   pure=False, retries=0, priority=priority)
            if leader is None or leader not in futures:
                leaders[key] = future
            futures[future] = (cell, submission, priority)
            return future

        for rank, cell in enumerate(longest_first(cells)):
            submit(cell, len(cells) - rank)

        def _collect(future: Any) -> None:
            cell, submission, priority = futures.pop(future)
            try:
                result = checked_result(store, cell, future.result())
            except Exception as exc:  # noqa: BLE001  e.g. KilledWorker: the worker process died
                if not attempt_started(store, cell.id, submission) and resubmits[cell.id] < MAX_RESUBMITS:
                    # Lost before it started (queued on a worker that died, or waiting for a lost cell): not a
                    # failure of this cell; run it again.
                    resubmits[cell.id] += 1
                    future.release()
                    submit(cell, priority)
                    return
                result = store.record(cell.id, failure_result(cell.id, cell.params, exc))
            # Let go of the finished task at once: Dask recomputes a task whose result lived on a worker that
            # dies later, and a cell is committed in the store, not held in worker memory.
            future.release()
            finished(cell.id, result)

        while futures:
            done = _wait_some(client, list(futures), scheduler)
            for future in done:
                _collect(future)
        seconds = time.perf_counter() - start
        if cleaned is not None:  # what killed workers left in .staging/ (their leases name workers now gone)
            cleaned += store.clear_debris(_scheduler_workers(client))
        return seconds
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        for name, log in quiet.items():
            log.setLevel(levels[name])


def _scheduler_workers(client: Any) -> Callable[[str], Iterable[str] | None]:
    """workers(scheduler address) for Store.clear_debris: the current workers of the client's scheduler."""
    def workers(address: str) -> Iterable[str] | None:
        try:
            if address != client.scheduler.address:
                return None
            return set(client.scheduler_info()["workers"])
        except Exception:  # noqa: BLE001  no answer: decide on heartbeats only
            return None

    return workers


def _wait_some(client: Any, futures: list[Any], scheduler: str | None, poll_s: float = 2.0) -> list[Any]:
    """The futures that are finished (waiting up to poll_s for one); UserError once the scheduler is lost."""
    from concurrent.futures import CancelledError

    from distributed import wait

    cancelled = False
    try:
        done = list(wait(futures, timeout=poll_s, return_when="FIRST_COMPLETED").done)
    except TimeoutError:
        done = []
    except CancelledError:  # the client lost the scheduler and cancelled every future
        done, cancelled = [], True
    lost = cancelled or client.status not in ("running", "connecting") or any(f.status == "cancelled" for f in done)
    if lost:
        where = f"the Dask scheduler at {scheduler}" if scheduler else "the local Dask cluster"
        raise UserError(f"lost {where} (client {client.status}); cells already committed are kept and cells still "
                        "running on the workers finish into the store: run the same command again to finish")
    return done
