"""`compare` / `demo`: one harness suite — several methods on the same data, model and eps, each verified with every
applicable verifier — run into a results store at `out`, then tabulated there as table.md / table.csv."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from .errors import UserError
from .harness.spec import Spec, parse_spec
from .training.config import TRAIN_FIELD_DEFAULTS, TrainConfig

SUITE_NAME = "compare"


def compare_spec_data(
    base: TrainConfig, methods: list[str], method_options: dict[str, dict[str, Any]], verify_limit: int,
    verifiers: list[str], data_root: str | None = None,
) -> dict[str, Any]:
    """The suite spec (as parsed TOML) of a comparison: a one-point grid, one method entry per method."""
    train = {name: getattr(base, name) for name in TRAIN_FIELD_DEFAULTS}
    spec: dict[str, Any] = {
        "name": SUITE_NAME,
        "description": f"abscert-bench compare: {', '.join(methods)} on {base.dataset} {base.model}, eps {base.eps:g}",
        "grid": {"datasets": [base.dataset], "models": [base.model], "eps": [float(base.eps)], "seeds": [base.seed]},
        "train": train,
        "methods": {m: {"method": m, **method_options.get(m, {})} for m in methods},
        "verify": {"verifiers": list(verifiers), "limit": int(verify_limit)},
    }
    if data_root is not None:
        spec["data"] = {"root": str(data_root)}
    return spec


def _without_none(value: Any) -> Any:
    """The mapping with None values left out at every level (TOML has no null: an option left out is its default)."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def compare_spec(
    base: TrainConfig, methods: list[str], method_options: dict[str, dict[str, Any]], verify_limit: int,
    verifiers: list[str], data_root: str | None = None,
) -> Spec:
    """The comparison as a validated harness Spec; its text (kept by the store as spec.toml) parses back to it,
    so `abscert-bench run OUT/spec.toml --out OUT` resumes the same suite."""
    import tomli_w

    from .harness.spec import tomllib

    data = compare_spec_data(base, methods, method_options, verify_limit, verifiers, data_root)
    text = tomli_w.dumps(_without_none(data))
    return parse_spec(tomllib.loads(text), f"{SUITE_NAME} (spec.toml)", text, default_name=SUITE_NAME)


def compare(
    base: TrainConfig, methods: list[str], method_options: dict[str, dict[str, Any]], out: Path,
    verify_limit: int | None = None, force: bool = False, data_root: str | None = None,
    verifiers: list[str] | None = None, progress: bool = True,
) -> str:
    """Train, verify and tabulate every method through the harness into the results store `out`; return the
    Markdown table (also written to out/table.md, the rows to out/table.csv). `verify_limit` None: every test
    image; `verifiers` None: every registered verifier (each cell runs those that apply to its model).
    An existing store of the same comparison is resumed; `force` discards it (never a folder the harness did
    not write)."""
    from .data import load_dataset
    from .harness.suite import run_suite
    from .harness.tables import load_rows, runs_markdown, write_rows_csv
    from .verification.base import all_verifier_names

    for method in methods:  # the one-line errors of TrainConfig before the spec's own
        replace(base, method=method, method_options=dict(method_options.get(method, {}))).validate()
    dataset = load_dataset(base.dataset, data_root)  # a missing dataset is an error here, not a skipped cell
    limit = len(dataset.test_x) if verify_limit is None else verify_limit
    if limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    spec = compare_spec(base, methods, method_options, limit, verifiers or all_verifier_names(), data_root)
    report = run_suite(spec, out, force=force, data_root=data_root, progress=progress)
    unfinished = {cell_id: r for cell_id, r in report.ran.items() if r["status"] != "done"}
    if unfinished:
        cell_id, result = min(unfinished.items())
        raise UserError(f"{len(unfinished)} of {report.total} runs did not finish; {cell_id}: {result['status']}: "
                        f"{result.get('error') or result.get('reason', '')} (log: {out / 'logs' / (cell_id + '.log')})")
    rows = load_rows(out)
    for row in rows:  # the run-directory table's columns: the run is the cell
        row["run"] = row.pop("cell")
        for key in ("label", "seed", "resized"):
            row.pop(key, None)
    table = runs_markdown(rows)
    (out / "table.md").write_text(table)
    write_rows_csv(out / "table.csv", rows)
    return table
