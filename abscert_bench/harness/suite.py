"""Run a whole spec: expand the grid, skip committed cells, run the rest in-process or on a Dask cluster."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .execute import run_cell
from .spec import Spec, training_key
from .store import Store


@dataclass
class SuiteReport:
    """What a `run` did: cells already complete, and the status of each cell it ran."""

    store: Path
    total: int
    already: list[str] = field(default_factory=list)
    ran: dict[str, dict[str, Any]] = field(default_factory=dict)
    debris: list[str] = field(default_factory=list)
    cleaned: list[str] = field(default_factory=list)  # debris of attempts killed during this run, removed at its end
    seconds: float = 0.0
    cells_seconds: float = 0.0  # from the first cell started to the last finished (no cluster start/stop)

    def count(self, status: str) -> int:
        """Cells run now that ended with `status`."""
        return sum(r["status"] == status for r in self.ran.values())

    def summary(self) -> str:
        """A few lines for the terminal."""
        parts = [f"{self.total} cells: {len(self.already)} already complete, {len(self.ran)} run now"]
        for status in ("done", "stopped", "skipped", "failed"):
            if self.count(status):
                parts.append(f"{self.count(status)} {status}")
        lines = [", ".join(parts) + f" ({self.seconds:.1f} s) → {self.store}"]
        if self.debris:
            lines.append(f"removed {len(self.debris)} half-built cell(s) left by an interrupted run")
        if self.cleaned:
            lines.append(f"removed {len(self.cleaned)} half-built cell(s) of attempts killed during this run")
        skipped = sorted({r.get("reason", "") for r in self.ran.values() if r["status"] == "skipped"})
        lines += [f"skipped: {reason}" for reason in skipped]
        for cell_id, r in sorted(self.ran.items()):
            if r["status"] == "failed":
                lines.append(f"failed: {cell_id}: {r.get('error', '?')} "
                             f"(log: {self.store / 'logs' / (cell_id + '.log')})")
            elif r["status"] == "stopped":
                lines.append(f"stopped: {cell_id}: {r.get('reason', '')}")
        return "\n".join(lines)


def run_suite(
    spec: Spec, out: str | Path, workers: int | None = None, scheduler: str | None = None, force: bool = False,
    data_root: str | None = None, progress: bool = True, torch_threads: int | None = None,
) -> SuiteReport:
    """Run every cell of `spec` that has no complete result in the store at `out`; returns what happened."""
    if workers is not None and scheduler is not None:
        raise UserError("give either --workers or --scheduler, not both")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    start = time.perf_counter()
    store = Store(out)
    try:
        debris = store.open(spec, force=force)
        report = SuiteReport(store=store.root, total=len(spec.cells), debris=debris)
        pending = []
        for cell in spec.cells:
            if store.is_complete(cell.id):
                report.already.append(cell.id)
            else:
                pending.append(cell)
        bar = _progress_bar(len(spec.cells), len(report.already)) if progress else None

        def finished(cell_id: str, result: dict[str, Any]) -> None:
            report.ran[cell_id] = result
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(" ".join(f"{s}={report.count(s)}" for s in ("done", "failed", "skipped",
                                                                                  "stopped") if report.count(s)))

        root = str(store.root)
        if not pending:
            pass
        elif workers is None and scheduler is None:
            cells_start = time.perf_counter()
            for cell in pending:
                if bar is not None:
                    bar.set_description(cell.id[:40])
                finished(cell.id, run_cell(cell.params, cell.id, root, data_root, torch_threads))
            report.cells_seconds = time.perf_counter() - cells_start
        else:
            from .cluster import run_on_dask

            report.cells_seconds = run_on_dask(pending, root, data_root, finished, workers=workers,
                                               scheduler=scheduler, torch_threads=torch_threads or 1, store=store,
                                               cleaned=report.cleaned)
        if bar is not None:
            bar.close()
        report.cleaned += store.clear_debris()  # what killed attempts left; live attempts' folders are kept
        drop_shared_trainings(spec, store)
        report.seconds = time.perf_counter() - start
        return report
    finally:
        store.unlock()


def drop_shared_trainings(spec: Spec, store: Store) -> None:
    """Forget each training that several cells share (natural models across eps) once all those cells are complete."""
    groups: dict[str, list[str]] = {}
    for cell in spec.cells:
        key, _ = training_key(cell.id, cell.params)
        if key != cell.id:
            groups.setdefault(key, []).append(cell.id)
    for key, cell_ids in groups.items():
        if all(store.is_complete(cell_id) for cell_id in cell_ids):
            store.drop_training(key)


def _progress_bar(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="cells", unit="cell", file=sys.stderr, dynamic_ncols=True)


def failure_result(cell_id: str, params: dict[str, Any], error: BaseException) -> dict[str, Any]:
    """A `failed` result for a cell whose task died outside run_cell (a killed Dask worker, say)."""
    import traceback

    message = f"{type(error).__name__}: {error}"
    if type(error).__name__ == "KilledWorker":
        message = ("KilledWorker: the worker process died while running this cell (most often out of memory "
                   "beyond the Dask nanny's limit; lower limits.memory_cap_mb or verify.batch_size)")
    return {"id": cell_id, "cell": params, "status": "failed", "stages": {},
            "error": message,
            "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__))}

