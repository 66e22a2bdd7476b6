"""Train several methods on the same data, model and eps; verify each with every applicable verifier; tabulate."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from .data import load_dataset
from .rundir import create_run_dir, write_csv
from .table import collect, to_csv_rows, to_markdown
from .training.loop import TrainConfig, run_training
from .verification.run import verify_run


def run_name(config: TrainConfig) -> str:
    """Directory name of a run: dataset_model_eps_method (and d, variant for AbsCert)."""
    name = f"{config.dataset}_{config.model}_eps{config.eps:g}_{config.method}"
    if "d" in config.method_options:
        d = config.method_options["d"]
        name += "_d" + "-".join(f"{v:g}" for v in (d if isinstance(d, list) else [d]))
        name += "_" + config.method_options.get("variant", "point")
    return name


def compare(
    base: TrainConfig, methods: list[str], method_options: dict[str, dict[str, Any]], out: Path,
    verify_limit: int | None = None, force: bool = False, data_root: str | None = None,
    verifiers: list[str] | None = None, on_epoch_factory: Callable[[str], Callable] | None = None,
    progress_factory=None,
) -> str:
    """Train, verify and tabulate every method into `out`; return the Markdown table (also written to out/)."""
    dataset = load_dataset(base.dataset, data_root)
    out.mkdir(parents=True, exist_ok=True)
    for method in methods:
        config = replace(base, method=method, method_options=dict(method_options.get(method, {})))
        config.validate()
        run_dir = create_run_dir(out / run_name(config), force=force)
        on_epoch = on_epoch_factory(method) if on_epoch_factory else None
        run_training(config, dataset, run_dir, on_epoch=on_epoch)
        verify_run(run_dir, verifiers=verifiers, skip_inapplicable=True, limit=verify_limit, device=base.device,
                   force=force, data_root=data_root, progress_factory=progress_factory)
    rows = collect([out])
    table = to_markdown(rows)
    (out / "table.md").write_text(table)
    csv_rows, fields = to_csv_rows(rows)
    write_csv(out / "table.csv", csv_rows, fields)
    return table

