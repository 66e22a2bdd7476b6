"""Run one cell (train → verify → optional export) into the store; safe to call in a Dask worker.

Everything the cell produces is built in a private staging directory and committed by one rename
(see store.py). Any exception becomes a `failed` result with its traceback; a missing dataset becomes
`skipped` with the prepare hint; a stage over its time/memory cap becomes `stopped` with the reason.
"""
from __future__ import annotations

import functools
import gc
import os
import platform
import shutil
import socket
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import UserError
from .lease import Lease, acquire, new_attempt_id, owner_info
from .spec import EXPORT_DEFAULTS, VERIFIER_LIMIT, cell_method, training_key
from .store import COMPLETE, Store, link_tree
from .watchdog import CapExceeded, StageGuard

PREPARE_HINT = "run `abscert-bench data prepare` (or put the files under --data-root / $ABSCERT_DATA)"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class CellLog:
    """Appends timestamped lines to the cell's log file (one file per cell, every attempt)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, message: str) -> None:
        with self.path.open("a") as handle:
            handle.write(f"{datetime.now().strftime('%H:%M:%S')} {message}\n")


@functools.lru_cache(maxsize=1)
def warm_process() -> None:
    """Pay a process's one-off costs before any timed stage: importing auto_LiRPA and the verifiers, and the
    optimizer's first step (which imports torch._dynamo, seconds on a busy CPU). Otherwise the first cell of
    every process would report a slower epoch than the others."""
    import torch

    from .. import verification  # noqa: F401  every built-in verifier module (and the plugins)
    from ..lirpa_compat import lirpa

    lirpa()
    weight = torch.zeros(1, requires_grad=True)
    torch.optim.Adam([weight]).step()


@functools.lru_cache(maxsize=2)
def _load(name: str, root: str | None):
    from ..data import load_dataset

    return load_dataset(name, root)


def cell_dataset(params: dict[str, Any], data_root: str | None):
    """The cell's dataset: train split limited to `train.limit` images, inputs resized when the spec says so."""
    from ..data import Dataset

    dataset = _load(params["dataset"], data_root)
    limit = int(params["train"].get("limit") or 0)
    if limit:
        dataset = replace(dataset, train_x=dataset.train_x[:limit], train_y=dataset.train_y[:limit])
        present = len(set(dataset.train_y.tolist()))
        if present < dataset.num_classes:
            raise UserError(f"train.limit = {limit}: the first {limit} training images of {dataset.name} hold only "
                            f"{present} of its {dataset.num_classes} classes (is the data ordered by class? "
                            "rebuild it with `abscert-bench data prepare --force`)")
    if params.get("resize"):
        dataset = Dataset(dataset.name, resize_images(dataset.train_x, params["resize"]), dataset.train_y,
                          resize_images(dataset.test_x, params["resize"]), dataset.test_y, dataset.num_classes)
    return dataset


def resize_images(x, shape: list[int]):
    """Bilinear resize to H×W and channel repetition/truncation to C; pixels stay in [0,1]."""
    import torch.nn.functional as F

    channels, height, width = shape
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False).clamp(0, 1)
    repeats = -(-channels // x.shape[1])
    return x.repeat(1, repeats, 1, 1)[:, :channels].contiguous()


def run_cell(params: dict[str, Any], cell_id: str, store_root: str, data_root: str | None = None,
             torch_threads: int | None = None, after: Any = None, submission: str | None = None) -> dict[str, Any]:
    """Run the cell and commit its result into the store; returns the committed result (never raises).
    `after` is ignored: on Dask it is the result of a cell this one must wait for (the one training its model).
    The attempt first takes the cell's lease (lease.py): while another attempt holds a live one it waits, and
    when that one commits the cell it returns the committed result without running anything.
    `submission`: the client's id for this task, logged once the attempt owns the cell (so the client can tell
    a task that died before it started from one that died running)."""
    store = Store(store_root)
    if not (store.root / "suite.json").exists():  # this process does not see the client's store: write nothing
        return {"id": cell_id, "cell": params, "status": "failed", "stages": {}, "store_missing": True,
                "host": socket.gethostname(), "pid": os.getpid(),
                "error": f"the results store {store.root} does not exist on host {socket.gethostname()} "
                         "(not a shared filesystem?)"}
    log = CellLog(store.log_path(cell_id))
    attempt = new_attempt_id()
    lease = acquire(store.staging_dir, cell_id, owner_info(attempt, submission),
                    complete=lambda: store.is_complete(cell_id), log=log)
    if lease is None:
        committed = store.result(cell_id) or {"id": cell_id, "cell": params, "status": "failed", "stages": {},
                                               "error": "the committed result vanished"}
        log(f"attempt {attempt} (submission {submission}): committed by attempt {committed.get('attempt', '?')}, "
            "nothing to do")
        return committed
    started = time.perf_counter()
    result: dict[str, Any] = {
        "id": cell_id, "cell": params, "status": "done", "stages": {}, "started": _now(),
        "host": socket.gethostname(), "pid": os.getpid(), "python": platform.python_version(),
        "attempt": attempt, "submission": submission,
    }
    try:
        staging = store.staging(cell_id, attempt)
        log(f"=== attempt {attempt} (submission {submission}) on {result['host']} pid {result['pid']} → "
            f"{staging.name}, lease {lease.path.name}")
        return _attempt(params, cell_id, store, staging, result, started, data_root, torch_threads, log, lease)
    finally:
        lease.release()


def _attempt(params: dict[str, Any], cell_id: str, store: Store, staging: Path, result: dict[str, Any],
             started: float, data_root: str | None, torch_threads: int | None, log: Callable[[str], None],
             lease: Lease | None) -> dict[str, Any]:
    try:
        import torch

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        result["torch_threads"] = torch.get_num_threads()
        _run_stages(params, staging, result, data_root or params.get("data_root"), log, store)
    except CapExceeded:  # raised outside a guard's block (a cap that fired during its exit): still a stop
        result["status"] = "stopped"
        result["reason"] = "over a cap"
    except BaseException as exc:  # noqa: BLE001  a crash in a cell must not stop the suite
        result["status"] = "failed"
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        log(result["traceback"].rstrip())
        if not isinstance(exc, Exception):  # KeyboardInterrupt / SystemExit: record, then let it go
            _finish(store, staging, cell_id, result, started, log, lease)
            raise
    return _finish(store, staging, cell_id, result, started, log, lease)


def _finish(store: Store, staging: Path, cell_id: str, result: dict[str, Any], started: float,
            log: Callable[[str], None], lease: Lease | None = None) -> dict[str, Any]:
    stage_seconds = sum(s.get("seconds", 0.0) for s in result["stages"].values() if not s.get("reused"))
    result["finished"] = _now()
    result["seconds"] = time.perf_counter() - started
    result["harness_overhead_s"] = max(0.0, result["seconds"] - stage_seconds)
    if lease is not None:
        lease.stop_heartbeat()
        if lease.lost or not lease.owned():  # stalled past the timeout: another attempt owns the cell now
            shutil.rmtree(staging, ignore_errors=True)
            log(f"attempt {result['attempt']} lost its lease {lease.path.name} (no heartbeat for longer than "
                f"{lease.data['timeout_s']:g} s): another attempt took the cell over; nothing committed")
            committed = store.result(cell_id)
            return committed if committed is not None else {**result, "status": "failed", "lease_lost": True,
                                                             "error": "lost its lease to another attempt"}
    log(f"status {result['status']}" + (f": {result.get('reason') or result.get('error')}"
                                        if result["status"] != "done" else "")
        + f" ({result['seconds']:.1f} s, harness overhead {result['harness_overhead_s']:.2f} s)")
    committed = store.commit(staging, cell_id, result)
    key, _ = training_key(cell_id, result["cell"])
    if committed["status"] in COMPLETE and key == cell_id:  # shared trainings are dropped by the suite at the end
        store.drop_training(cell_id)
    return committed


def _run_stages(params: dict[str, Any], staging: Path, result: dict[str, Any], data_root: str | None,
                log: Callable[[str], None], store: Store) -> None:
    from ..models import count_parameters
    from ..trained import build_network
    from ..training.config import config_from_settings
    try:
        dataset = cell_dataset(params, data_root)
    except UserError as exc:
        if "not found" not in str(exc):
            raise
        result["status"] = "skipped"
        result["reason"] = f"data missing: {exc}; {PREPARE_HINT}"
        log(result["reason"])
        return
    train = params["train"]
    eps = params["eps"]
    config = config_from_settings(train, dataset=params["dataset"], model=params["model"], method=params["method"],
                                  eps=eps, seed=params["seed"], method_options=dict(params["method_options"]))
    probe = cell_method(params)
    model_config = {"model": config.model, "input_shape": list(dataset.input_shape),
                    "num_classes": dataset.num_classes, "activation": config.activation,
                    "abstraction": probe.abstraction().to_dict() if probe.abstraction() else None}
    result["parameters"] = count_parameters(build_network(model_config))
    result["input_shape"] = list(dataset.input_shape)
    result["train_images"] = len(dataset.train_x)
    if params.get("resize"):
        result["resized"] = "inputs resized to {}×{}×{} (only the shape matters here)".format(*params["resize"])
    run_dir = staging / "run"
    key, settings = training_key(result["id"], params)
    saved = store.saved_training(key, settings)
    if saved is not None:  # trained by an earlier attempt (that died later) or by a cell at another eps
        link_tree(saved[0], run_dir)
        result["stages"]["train"] = {**saved[1]["train"], "reused": True}
        log(f"reusing the training saved as {key} ({saved[1]['train'].get('epochs')} epochs, by "
            f"{saved[1].get('cell', 'an earlier attempt')})")
    else:
        if not _train_stage(params, config, dataset, run_dir, result, log):
            return
        store.save_training(key, run_dir, {"params": settings, "train": result["stages"]["train"],
                                           "cell": result["id"]}, attempt=result.get("attempt"))
    verify_stages(params, run_dir, dataset, result, log)
    if params.get("export"):
        export_stage(params, run_dir, staging, result, data_root, log)


def _train_stage(params: dict[str, Any], config, dataset, run_dir: Path, result: dict[str, Any],
                 log: Callable[[str], None]) -> bool:
    """Train into run_dir under the caps; records the stage; False when a cap stopped it."""
    from ..rundir import finish_run_dir
    from ..training.loop import run_training

    eps = params["eps"]
    run_dir.mkdir()
    epochs: list[dict[str, Any]] = []

    def on_epoch(row: dict[str, Any]) -> None:
        epochs.append({k: (float(v) if v != "" else None) for k, v in row.items()})  # eps is "" without a schedule
        log(f"train epoch {int(row['epoch'])}: loss {row['loss']:.4f} test acc {row['test_acc']:.3f} "
            f"({row['train_time_s']:.2f} s)")

    warm_process()  # one-off imports outside the timed, memory-measured stages
    limits = params["limits"]
    log(f"train {config.method} {config.model} on {config.dataset} (eps {eps:g}, {len(dataset.train_x)} images, "
        f"{result['parameters']} parameters)")
    with StageGuard(limits["train_time_cap_s"], limits["memory_cap_mb"], config.device) as guard:
        run_training(config, dataset, run_dir, on_epoch=on_epoch)
    finish_run_dir(run_dir)  # the run directory's marker: a stopped one (no checkpoint) is still the tool's
    final = _final_epochs(run_dir) or epochs  # the final model's epochs (a granularity search's come first)
    train_stage = {**guard.report(), "epochs": len(epochs), "final_epochs": len(final),
                   "train_s": sum(e["train_time_s"] for e in final),
                   "budget_s": config.budget_s or None,
                   "s_per_epoch": (sum(e["train_time_s"] for e in final) / len(final)) if final else None}
    result["stages"]["train"] = train_stage
    if guard.stopped:
        _stop(result, f"training stopped after {len(epochs)} epoch(s): {guard.stopped}", log)
        return False
    return True


def _final_epochs(run_dir: Path) -> list[dict[str, Any]]:
    """Per-epoch rows of the final training (metrics.csv), [] when training did not get that far."""
    from ..rundir import read_csv

    path = run_dir / "metrics.csv"
    return [{"train_time_s": float(row["train_time_s"])} for row in read_csv(path)] if path.exists() else []


def _stop(result: dict[str, Any], reason: str, log: Callable[[str], None]) -> None:
    result["status"] = "stopped"
    result["reason"] = reason
    log(reason)


def verify_stages(params: dict[str, Any], run_dir: Path, dataset, result: dict[str, Any],
                  log: Callable[[str], None]) -> None:
    """Each applicable verifier (or their cascade) on the first `verify.limit` test images, each under the caps."""
    import inspect

    from ..trained import load_checkpoint
    from ..verification.base import VERIFIERS, create_verifier
    from ..verification.cascade import run_cascade
    from ..verification.run import results_dir, write_results

    verify, limits = params["verify"], params["limits"]
    device = params["train"]["device"]
    trained = load_checkpoint(run_dir / "checkpoint.pt", device)

    n_all = min(int(verify["limit"]), len(dataset.test_x))

    def samples(name: str) -> int:
        return min(n_all, int(verify["options"].get(name, {}).get(VERIFIER_LIMIT, n_all)))

    def build(name: str):
        options = {k: v for k, v in verify["options"].get(name, {}).items() if k != VERIFIER_LIMIT}
        if "timeout" in inspect.signature(VERIFIERS.get(name)).parameters:
            options.setdefault("timeout", verify["timeout"])
        return create_verifier(name, **options)

    built = [v for v in (build(n) for n in verify["verifiers"]) if v.applies_to(trained)]
    if not built:
        log("no verifier in verify.verifiers applies to this model")
        return
    eps = params["eps"]
    out_dir = results_dir(run_dir, eps)
    jobs = [("cascade:" + "+".join(v.name for v in built), built)] if verify["cascade"] else \
        [(v.name, [v]) for v in built]
    for name, stages in jobs:
        n = samples(stages[0].name) if len(stages) == 1 else n_all
        x, y = dataset.test_x[:n].to(device), dataset.test_y[:n].to(device)
        with StageGuard(limits["verify_time_cap_s"], limits["memory_cap_mb"], device) as guard:
            if len(stages) == 1:
                answers = stages[0].verify(trained, x, y, eps, batch_size=verify["batch_size"])
            else:
                answers = run_cascade(stages, trained, x, y, eps, batch_size=verify["batch_size"])
            meaning = " > ".join(s.meaning for s in stages)
            summary = write_results(out_dir, name, meaning, all(s.sound for s in stages),
                                    all(s.attack_only for s in stages), eps, answers, x.cpu())
        stage = guard.report()
        if guard.stopped:
            gc.collect()  # the stopped stage's traceback frames (and their tensors) may sit in reference cycles
            stage["status"] = "stopped"
            result["stages"][f"verify:{name}"] = stage
            _stop(result, f"verifier {name} stopped: {guard.stopped}", log)
            continue
        stage.update({"status": "ok", "samples": summary["samples"], "verified": summary["verified"],
                      "falsified": summary["falsified"], "unknown": summary["unknown"],
                      "ms_per_sample": 1000 * summary["time_mean_s"]})
        result["stages"][f"verify:{name}"] = stage
        log(f"verify {name}: verified {summary['verified']}/{summary['samples']}, falsified {summary['falsified']}, "
            f"unknown {summary['unknown']} ({stage['ms_per_sample']:.1f} ms/sample)")


def export_stage(params: dict[str, Any], run_dir: Path, staging: Path, result: dict[str, Any],
                 data_root: str | None, log: Callable[[str], None]) -> None:
    """VNN-COMP export of the trained model into the cell's vnncomp/ folder, then (`run_back`) `vnncomp run` on it,
    so the folder carries our verdicts (results.csv, results/) for other verifiers to be compared with."""
    from ..vnncomp import export_benchmark, run_benchmark

    if params.get("resize"):
        result["stages"]["export"] = {"status": "skipped", "seconds": 0.0,
                                      "reason": "inputs resized: the exported properties would not match the data"}
        log("export skipped: inputs resized")
        return
    export = params["export"]
    start = time.perf_counter()
    meta = export_benchmark(run_dir, staging / "vnncomp", samples=export["samples"], seed=export["seed"],
                            timeout=export["timeout"], data_root=data_root)
    stage: dict[str, Any] = {"status": "ok", "seconds": time.perf_counter() - start,
                             "instances": len(meta.get("instances", []))}
    log(f"exported {stage['instances']} VNN-COMP instances")
    if export.get("run_back", EXPORT_DEFAULTS["run_back"]):
        rows = run_benchmark(staging / "vnncomp")
        stage["results"] = dict(Counter(row["result"] for row in rows))
        stage["seconds"] = time.perf_counter() - start
        log("vnncomp run: " + ", ".join(f"{k} {v}" for k, v in sorted(stage["results"].items())))
    result["stages"]["export"] = stage
