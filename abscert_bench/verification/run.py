"""Verify a run directory's model on its dataset's test split; results go under RUN/verify/eps=<eps>/."""
from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..abstraction import check_eps
from ..data import load_dataset
from ..errors import UserError
from ..owned import check_writable
from ..rundir import write_csv, write_json
from ..sound.recheck import save_counterexamples
from ..trained import TrainedModel, check_input_shape, load_checkpoint
from ..validate import read_run_config
from .base import SampleResult, Verifier, all_verifier_names, create_verifier, summarize, verifier_takes
from .cascade import run_cascade


def applicable_verifiers(trained: TrainedModel, among: list[str] | None = None) -> list[str]:
    """Names of the verifiers (all registered ones, or those `among`) that can check this model."""
    return [name for name in (all_verifier_names() if among is None else among)
            if create_verifier(name).applies_to(trained)]


def results_dir(run_dir: Path, eps: float, first: int | None = None) -> Path:
    """Where results for `eps` live: `verify/eps=E` for the whole test split, `verify/eps=E,first=N` for a prefix."""
    return run_dir / "verify" / (f"eps={eps:g}" if first is None else f"eps={eps:g},first={first}")


def result_rows(results: list[SampleResult]) -> list[dict[str, Any]]:
    """Per-sample CSV rows (details flattened with a `detail_` prefix)."""
    rows = []
    for r in results:
        row = {"index": r.index, "label": r.label, "status": r.status, "time_s": f"{r.time_s:.6f}",
               "decided_by": r.decided_by}
        row.update({f"detail_{k}": v for k, v in sorted(r.details.items())})
        rows.append(row)
    return rows


def result_files(out_dir: Path, name: str) -> list[Path]:
    """The files `write_results` writes for one verifier."""
    return [out_dir / f"{name}.json", out_dir / f"{name}.csv", out_dir / f"{name}.counterexamples.npz"]


def is_own_result(path: Path, name: str) -> bool:
    """Whether `path` (one of `result_files`) is what abscert-bench writes there: a summary JSON naming the
    verifier, a per-sample CSV with its header, a counterexample archive with its arrays."""
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            return isinstance(data, dict) and data.get("verifier") == name and "meaning" in data
        if path.suffix == ".csv":
            first = path.read_text().split("\n", 1)[0].strip()
            return first == "" or first.startswith("index,label,status")
        with zipfile.ZipFile(path) as archive:
            return {"index.npy", "x.npy", "x_adv.npy", "label.npy", "eps.npy"} <= set(archive.namelist())
    except (OSError, UnicodeDecodeError, ValueError, zipfile.BadZipFile):
        return False


def check_replaceable(out_dir: Path, name: str, force: bool) -> None:
    """Existing results of a verifier need `force`; a file there that abscert-bench did not write is never
    replaced, even with `force`."""
    for path in result_files(out_dir, name):
        if not path.exists():
            continue
        if not is_own_result(path, name):
            raise UserError(f"{path} exists and is not a result abscert-bench wrote, so even --force does not "
                            "replace it; move it away (nothing was changed)")
        if not force:
            raise UserError(f"results {path} exist; pass --force to overwrite")


def write_results(out_dir: Path, name: str, meaning: str, sound: bool, attack_only: bool, eps: float,
                  results: list[SampleResult], x_by_index: Any) -> dict[str, Any]:
    """Write per-sample CSV, summary JSON and counterexamples (npz) for one verifier."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result_rows(results)
    fields = sorted({k for row in rows for k in row}, key=lambda k: (k.startswith("detail_"), k))
    fields = [f for f in ["index", "label", "status", "time_s", "decided_by"] if f in fields] + \
             [f for f in fields if f.startswith("detail_")]
    write_csv(out_dir / f"{name}.csv", rows, fields)
    if any(r.counterexample is not None for r in results):
        save_counterexamples(out_dir / f"{name}.counterexamples.npz", results, x_by_index, eps)
    else:  # a replaced result's counterexamples would no longer belong to it
        (out_dir / f"{name}.counterexamples.npz").unlink(missing_ok=True)
    summary = {"verifier": name, "meaning": meaning, "sound": sound, "attack_only": attack_only, "eps": eps,
               **summarize(results)}
    write_json(out_dir / f"{name}.json", summary)
    return summary


def verify_run(
    run_dir: Path, verifiers: list[str] | None = None, eps: float | None = None, limit: int | None = None,
    cascade: bool = False, batch_size: int = 64, device: str = "cpu", force: bool = False,
    data_root: str | None = None, progress_factory: Callable[[str, int], Any] | None = None,
    timeout: float | None = None, skip_inapplicable: bool = False, memory_mb: float | None = None,
) -> list[dict[str, Any]]:
    """Run each verifier (or their cascade) on the run's test split and write the results; return summaries.

    `timeout` (s per sample) and `memory_mb` (budget of one bound call) go to every verifier that takes them."""
    config = read_run_config(Path(run_dir))
    if limit is not None and limit < 1:
        raise UserError(f"limit must be >= 1 (first N test samples), got {limit}")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    trained = load_checkpoint(run_dir / "checkpoint.pt", device)
    dataset = load_dataset(config["dataset"], data_root)
    check_input_shape(trained, dataset.input_shape, dataset.name)
    eps = check_eps(config["eps"] if eps is None else eps)
    names = applicable_verifiers(trained, verifiers) if skip_inapplicable or not verifiers else verifiers
    if timeout is not None and not timeout > 0:
        raise UserError(f"per-sample timeout must be > 0 seconds, got {timeout}")
    if memory_mb is not None and not memory_mb > 0:
        raise UserError(f"memory budget must be > 0 MiB, got {memory_mb}")
    limits = {"timeout": timeout, "memory_mb": memory_mb}
    options = {n: {k: v for k, v in limits.items() if v is not None and verifier_takes(n, k)} for n in names}
    n = len(dataset.test_x) if limit is None else min(limit, len(dataset.test_x))
    x, y = dataset.test_x[:n].to(device), dataset.test_y[:n].to(device)
    out_dir = results_dir(run_dir, eps, None if n == len(dataset.test_x) else n)

    def refuse_existing(name: str) -> None:
        check_replaceable(out_dir, name, force)

    check_writable(out_dir)
    summaries = []
    for name, stages, results in run_verifiers(trained, x, y, eps, names, options, cascade, batch_size,
                                               progress_factory, before=refuse_existing,
                                               what=f"this {config['method']} model"):
        meaning = " > ".join(s.meaning for s in stages) if len(stages) > 1 else stages[0].meaning
        sound = all(s.sound for s in stages)
        attack_only = all(s.attack_only for s in stages)
        summaries.append(write_results(out_dir, name, meaning, sound, attack_only, eps, results, x.cpu()))
    return summaries


def run_verifiers(
    trained: TrainedModel, x: Any, y: Any, eps: float, names: list[str], options: dict[str, dict[str, Any]],
    cascade: bool = False, batch_size: int = 64, progress_factory: Callable[[str, int], Any] | None = None,
    before: Callable[[str], None] | None = None, what: str = "this model",
) -> Iterator[tuple[str, list[Verifier], list[SampleResult]]]:
    """Build the verifiers `names` (with their `options`) and run each, or their cascade, on (x, y) at eps.

    Yields (name, verifiers, per-sample results) one job at a time (the CLI writes each as it finishes). Every
    verifier is built and checked against the model before the first runs; `before(name)` is called for every
    job first too (the CLI refuses existing results there). Shared by `verify_run` and `abscert_bench.api.verify`.
    """
    built: list[Verifier] = [create_verifier(n, **options.get(n, {})) for n in names]
    for v in built:
        if not v.applies_to(trained):
            raise UserError(f"verifier {v.name} does not apply to {what} ({v.meaning})")
    jobs = [("cascade:" + "+".join(names), built)] if cascade else [(v.name, [v]) for v in built]
    if before is not None:
        for name, _ in jobs:
            before(name)
    return _run_jobs(jobs, trained, x, y, eps, batch_size, progress_factory)


def _run_jobs(jobs, trained, x, y, eps, batch_size, progress_factory):
    for name, stages in jobs:
        bar = progress_factory(name, len(x)) if progress_factory else None
        update = bar.update if bar is not None else None
        if len(stages) == 1:
            results = stages[0].verify(trained, x, y, eps, batch_size=batch_size, progress=update)
        else:
            results = run_cascade(stages, trained, x, y, eps, batch_size=batch_size, progress=update)
        if bar is not None:
            bar.close()
        yield name, stages, results

