"""Suite specs (TOML): validated into a grid of cells, each one train → verify → optional export.

Every error names the file and the dotted key, e.g. `specs/x.toml: grid.models[1]: unknown model 'fc9'; valid: …`.
See docs/harness.md for the full key reference.
"""
from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..training.config import LR_SCHEDULES, TRAIN_FIELD_DEFAULTS

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

# Training settings a spec may set in [train] and override per method entry (TrainConfig fields + harness ones).
TRAIN_DEFAULTS: dict[str, Any] = {**TRAIN_FIELD_DEFAULTS, "limit": 0}  # limit: first N training images (0 = all)
VERIFY_DEFAULTS: dict[str, Any] = {
    "verifiers": ["abscert-paper", "abscert-sound", "ibp", "crown", "alpha-crown"], "cascade": False,
    "timeout": 10.0, "limit": 100, "batch_size": 64, "options": {},
}
# run_back: solve the exported instances with `vnncomp run` (results.csv + results/ beside them) in the same stage
EXPORT_DEFAULTS: dict[str, Any] = {"samples": 5, "seed": 0, "timeout": 60.0, "run_back": True}
# time_cap_s caps every stage; train_time_cap_s / verify_time_cap_s, when given, replace it for that kind of stage.
LIMIT_DEFAULTS: dict[str, Any] = {"time_cap_s": 0.0, "memory_cap_mb": 0.0, "train_time_cap_s": None,
                                  "verify_time_cap_s": None}
DATA_DEFAULTS: dict[str, Any] = {"root": None, "resize": None}
GRID_KEYS = {"datasets", "models", "eps", "seeds"}
TOP_KEYS = {"name", "description", "grid", "train", "methods", "verify", "export", "limits", "data"}
METHOD_KEYS = {"method", "sweep", "train_time_cap_s"}  # train_time_cap_s: this method's own training cap
VERIFIER_LIMIT = "limit"  # [verify.options.<verifier>] limit = N: that verifier sees only the first N images
GRANULARITY_OPTION = "d"  # AbsCert's granularity: each cell keeps only the values with d >= 2·eps (the paper's rule);
# protocol official / clean take no d: they generate their candidates (abscert_bench/official.py)


@dataclass(frozen=True)
class Cell:
    """One unit of work: train one model, verify it, optionally export it. `params` is plain JSON."""

    id: str
    params: dict[str, Any] = field(hash=False)

    def __getitem__(self, key: str) -> Any:
        return self.params[key]


@dataclass
class Spec:
    """A validated suite spec and its expanded cells."""

    name: str
    description: str
    source: str
    text: str
    cells: list[Cell]

    def fingerprint(self) -> str:
        """Hash of everything that decides the cells' results (names, grid, hyper-parameters)."""
        canonical = json.dumps([[c.id, c.params] for c in self.cells], sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class _Checker:
    """Raises UserErrors prefixed with the file name and dotted key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> UserError:
        return UserError(f"{self.source}: {key}: {message}")

    def table(self, data: Any, key: str, allowed: set[str] | None) -> dict[str, Any]:
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise self.fail(key, f"expected a table, got {type(data).__name__}")
        if allowed is not None:
            unknown = sorted(set(data) - allowed)
            if unknown:
                raise self.fail(f"{key}.{unknown[0]}" if key else unknown[0],
                                f"unknown key; valid: {', '.join(sorted(allowed))}")
        return data

    def number(self, value: Any, key: str, lo: float | None = None, hi: float | None = None,
               integer: bool = False, lo_open: bool = False) -> float | int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            raise self.fail(key, f"expected {'an integer' if integer else 'a number'}, got {value!r}")
        if not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo)) or \
                (hi is not None and value > hi):
            bound = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise self.fail(key, f"{value!r} is out of range {bound}")
        return value

    def string_list(self, value: Any, key: str) -> list[str]:
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise self.fail(f"{key}[{i}]", f"expected a name, got {item!r}")
        self.unique(items, key)
        return items

    def unique(self, items: list[Any], key: str) -> None:
        seen: set[str] = set()
        for i, item in enumerate(items):
            token = json.dumps(item, sort_keys=True)
            if token in seen:
                raise self.fail(f"{key}[{i}]", f"duplicate value {item!r} (each grid value must appear once)")
            seen.add(token)

    def registered(self, name: str, key: str, registry: Any) -> None:
        try:
            registry.get(name)
        except UserError as exc:
            raise self.fail(key, str(exc)) from None


def load_spec(path: str | Path) -> Spec:
    """Read and validate a TOML spec file."""
    from ..validate import read_text_file

    path = Path(path)
    text = read_text_file(path, "spec")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    return parse_spec(data, str(path), text, default_name=path.stem)


def parse_spec(data: dict[str, Any], source: str = "<spec>", text: str = "", default_name: str = "suite") -> Spec:
    """Validate a parsed spec and expand its grid into cells."""
    from ..data import DATASETS
    from ..models import ACTIVATIONS, MODELS
    from ..training.methods import METHODS
    from ..verification.base import VERIFIERS, all_verifier_names

    check = _Checker(source)
    check.table(data, "", TOP_KEYS)
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name or any(c in name for c in "/\\"):
        raise check.fail("name", f"expected a plain name, got {name!r}")
    description = data.get("description", "")

    grid = check.table(data.get("grid"), "grid", GRID_KEYS)
    for key in ("datasets", "models", "eps"):
        if key not in grid:
            raise check.fail(f"grid.{key}", "missing (the grid needs datasets, models and eps)")
    datasets = check.string_list(grid["datasets"], "grid.datasets")
    models = check.string_list(grid["models"], "grid.models")
    eps_values = grid["eps"] if isinstance(grid["eps"], list) else [grid["eps"]]
    seeds = grid.get("seeds", [0])
    seeds = seeds if isinstance(seeds, list) else [seeds]
    for key, values in (("datasets", datasets), ("models", models), ("eps", eps_values), ("seeds", seeds)):
        if not values:
            raise check.fail(f"grid.{key}", "empty list: the grid would have no cells")
    for i, d in enumerate(datasets):
        check.registered(d, f"grid.datasets[{i}]", DATASETS)
    for i, m in enumerate(models):
        check.registered(m, f"grid.models[{i}]", MODELS)
    for i, e in enumerate(eps_values):
        check.number(e, f"grid.eps[{i}]", 0.0, 1.0)
    for i, s in enumerate(seeds):
        check.number(s, f"grid.seeds[{i}]", 0, integer=True)
    check.unique(eps_values, "grid.eps")
    check.unique(seeds, "grid.seeds")

    train = {**TRAIN_DEFAULTS, **check.table(data.get("train"), "train", set(TRAIN_DEFAULTS))}
    _check_train(check, train, "train", ACTIVATIONS)

    methods_table = check.table(data.get("methods"), "methods", None)
    if not methods_table:
        raise check.fail("methods", "no training methods (add e.g. [methods.abscert] and [methods.ibp])")
    entries = []
    for label, entry in methods_table.items():
        key = f"methods.{label}"
        entry = check.table(entry, key, None)
        method = entry.get("method", label)
        if not isinstance(method, str):
            raise check.fail(f"{key}.method", f"expected a method name, got {method!r}")
        check.registered(method, f"{key}.method" if "method" in entry else key, METHODS)
        sweep = check.string_list(entry.get("sweep", []), f"{key}.sweep")
        overrides = {k: v for k, v in entry.items() if k in TRAIN_DEFAULTS}
        method_train = {**train, **overrides}
        _check_train(check, method_train, key, ACTIVATIONS)
        options = {k: v for k, v in entry.items() if k not in TRAIN_DEFAULTS and k not in METHOD_KEYS}
        cap_override = {}
        if "train_time_cap_s" in entry:
            check.number(entry["train_time_cap_s"], f"{key}.train_time_cap_s", 0.0)
            cap_override["train_time_cap_s"] = entry["train_time_cap_s"]
        parameters = inspect.signature(METHODS.get(method)).parameters
        for option in options:
            if option not in parameters or option == "eps":
                valid = [p for p, info in parameters.items()
                         if p != "eps" and info.kind not in (info.VAR_KEYWORD, info.VAR_POSITIONAL)]
                raise check.fail(f"{key}.{option}", f"unknown option of method {method}; valid: "
                                 f"{', '.join(valid) or 'none'} (and the [train] keys)")
        for option in sweep:
            if option not in options or not isinstance(options[option], list) or not options[option]:
                raise check.fail(f"{key}.sweep", f"{option!r} must name a list-valued option of this method")
        entries.append((label, method, options, sweep, method_train, cap_override))

    verify = {**VERIFY_DEFAULTS, **check.table(data.get("verify"), "verify", set(VERIFY_DEFAULTS))}
    verifiers = check.string_list(verify["verifiers"], "verify.verifiers")
    if not verifiers:
        raise check.fail("verify.verifiers", "empty list (name at least one verifier)")
    known_verifiers = all_verifier_names()
    for i, v in enumerate(verifiers):
        check.registered(v, f"verify.verifiers[{i}]", VERIFIERS)
    if not isinstance(verify["cascade"], bool):
        raise check.fail("verify.cascade", f"expected true or false, got {verify['cascade']!r}")
    check.number(verify["timeout"], "verify.timeout", 0.0, lo_open=True)
    check.number(verify["limit"], "verify.limit", 1, integer=True)
    check.number(verify["batch_size"], "verify.batch_size", 1, integer=True)
    verifier_options = check.table(verify["options"], "verify.options", set(known_verifiers))
    for v, options in verifier_options.items():
        check.table(options, f"verify.options.{v}", None)
        if VERIFIER_LIMIT in options:
            check.number(options[VERIFIER_LIMIT], f"verify.options.{v}.{VERIFIER_LIMIT}", 1, integer=True)
            if verify["cascade"]:
                raise check.fail(f"verify.options.{v}.{VERIFIER_LIMIT}",
                                 "a per-verifier limit needs cascade = false (a cascade runs on verify.limit images)")
        builder_options = {k: o for k, o in options.items() if k != VERIFIER_LIMIT}
        _build(check, f"verify.options.{v}", lambda v=v, o=builder_options: VERIFIERS.get(v)(**o))
    verify_params = {"verifiers": verifiers, "cascade": verify["cascade"], "timeout": float(verify["timeout"]),
                     "limit": verify["limit"], "batch_size": verify["batch_size"],
                     "options": {v: dict(o) for v, o in sorted(verifier_options.items())}}

    export = None
    if "export" in data:
        export = {**EXPORT_DEFAULTS, **check.table(data["export"], "export", set(EXPORT_DEFAULTS))}
        check.number(export["samples"], "export.samples", 1, integer=True)
        check.number(export["seed"], "export.seed", 0, integer=True)
        check.number(export["timeout"], "export.timeout", 0.0, lo_open=True)
        if not isinstance(export["run_back"], bool):
            raise check.fail("export.run_back", f"must be true or false, not {export['run_back']!r}")
    limits = {**LIMIT_DEFAULTS, **check.table(data.get("limits"), "limits", set(LIMIT_DEFAULTS))}
    for key, value in limits.items():
        if value is not None:
            check.number(value, f"limits.{key}", 0.0)
    for stage in ("train", "verify"):
        if limits[f"{stage}_time_cap_s"] is None:
            limits[f"{stage}_time_cap_s"] = limits["time_cap_s"]
    data_table = {**DATA_DEFAULTS, **check.table(data.get("data"), "data", set(DATA_DEFAULTS))}
    resize = data_table["resize"]
    if resize is not None:
        if not (isinstance(resize, list) and len(resize) == 3 and
                all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in resize)):
            raise check.fail("data.resize", f"expected [channels, height, width] of positive integers, got {resize!r}")
    if data_table["root"] is not None and not isinstance(data_table["root"], str):
        raise check.fail("data.root", f"expected a path, got {data_table['root']!r}")

    cells = _expand(check, datasets, models, eps_values, seeds, entries, verify_params, export, limits, data_table)
    return Spec(name=name, description=str(description), source=source, text=text, cells=cells)


TRAINING_IRRELEVANT = ("verify", "export", "label", "entry")  # cell settings that do not change the trained model


def cell_method(params: dict[str, Any]):
    """The cell's TrainingMethod (with the first d of a granularity search list: enough to know its kind)."""
    from ..training.methods import create_method

    options = {k: (v[0] if k == GRANULARITY_OPTION and isinstance(v, list) else v)
               for k, v in params["method_options"].items()}
    return create_method(params["method"], params["eps"], **options)


def training_key(cell_id: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(key, settings) of the model a cell trains. Cells with the same key train the same model: natural training
    ignores eps, so its cells at different eps share one model (the key replaces `_eps<eps>_` by `_epsany_`)."""
    settings = {k: v for k, v in params.items() if k not in TRAINING_IRRELEVANT}
    method = cell_method(params)
    if method.uses_eps_schedule or method.abstraction() is not None:
        return cell_id, settings
    marker = f"_eps{params['eps']:g}_"
    settings.pop("eps")
    return cell_id.replace(marker, "_epsany_", 1), settings


def _check_train(check: _Checker, train: dict[str, Any], key: str, activations: dict[str, Any]) -> None:
    check.number(train["epochs"], f"{key}.epochs", 1, integer=True)
    check.number(train["batch_size"], f"{key}.batch_size", 1, integer=True)
    check.number(train["lr"], f"{key}.lr", 0.0, lo_open=True)
    check.number(train["warmup_epochs"], f"{key}.warmup_epochs", 0, integer=True)
    check.number(train["ramp_epochs"], f"{key}.ramp_epochs", 0, integer=True)
    check.number(train["kappa_end"], f"{key}.kappa_end", 0.0, 1.0)
    check.number(train["limit"], f"{key}.limit", 0, integer=True)
    check.number(train["grad_norm"], f"{key}.grad_norm", 0.0)
    check.number(train["lr_decay"], f"{key}.lr_decay", 0.0, 1.0, lo_open=True)
    check.number(train["lr_warmup_epochs"], f"{key}.lr_warmup_epochs", 0.0)
    check.number(train["budget_s"], f"{key}.budget_s", 0.0)
    if train["lr_schedule"] not in LR_SCHEDULES:
        raise check.fail(f"{key}.lr_schedule", f"unknown schedule {train['lr_schedule']!r}; "
                         f"valid: {', '.join(LR_SCHEDULES)}")
    milestones = train["lr_milestones"]
    if not isinstance(milestones, list):
        raise check.fail(f"{key}.lr_milestones", f"expected a list of epochs, got {milestones!r}")
    for i, m in enumerate(milestones):
        check.number(m, f"{key}.lr_milestones[{i}]", 1, integer=True)
    if train["activation"] not in activations:
        raise check.fail(f"{key}.activation", f"unknown activation {train['activation']!r}; "
                         f"valid: {', '.join(activations)}")
    if not isinstance(train["device"], str) or not train["device"].startswith(("cpu", "cuda")):
        raise check.fail(f"{key}.device", f"expected 'cpu' or 'cuda[:N]', got {train['device']!r}")


def _build(check: _Checker, key: str, builder: Any) -> Any:
    try:
        return builder()
    except UserError as exc:
        raise check.fail(key, str(exc)) from None
    except TypeError as exc:
        raise check.fail(key, f"bad options: {exc}") from None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "-".join(_fmt(v) for v in value)
    return str(value)


def _expand(
    check: _Checker, datasets: list[str], models: list[str], eps_values: list[float], seeds: list[int],
    entries: list[tuple[str, str, dict[str, Any], list[str], dict[str, Any], dict[str, Any]]], verify: dict[str, Any],
    export: dict[str, Any] | None, limits: dict[str, Any], data_table: dict[str, Any],
) -> list[Cell]:
    """The grid: datasets × models × eps × method entries (× swept options) × seeds; duplicates are errors."""
    from ..training.methods import create_method

    cells: list[Cell] = []
    seen: dict[str, str] = {}
    for dataset, model, eps, (label, method, options, sweep, train, cap_override), seed in itertools.product(
            datasets, models, eps_values, entries, seeds):
        key = f"methods.{label}"
        swept = [[(o, v) for v in options[o]] for o in sweep]
        for combo in itertools.product(*swept) if swept else [()]:
            concrete = {**options, **dict(combo)}
            if concrete.get("protocol", "pixel") != "pixel" and GRANULARITY_OPTION in concrete:
                raise check.fail(f"{key}.{GRANULARITY_OPTION}",
                                 f"protocol {concrete['protocol']!r} generates its own granularity candidates "
                                 "(the official rule at paper eps = 2·eps); drop d")
            if GRANULARITY_OPTION in concrete:
                grid = concrete[GRANULARITY_OPTION]
                values = grid if isinstance(grid, list) else [grid]
                for i, d in enumerate(values):
                    check.number(d, f"{key}.{GRANULARITY_OPTION}" + (f"[{i}]" if isinstance(grid, list) else ""),
                                 0.0, 1.0, lo_open=True)
                kept = [d for d in values if d >= 2 * eps - 1e-12]
                if not kept:
                    if combo:
                        continue  # a swept d too fine for this eps: no cell (the paper's rule d >= 2·eps)
                    raise check.fail(f"{key}.{GRANULARITY_OPTION}",
                                     f"no granularity d >= 2*eps = {2 * eps:g} for grid.eps {eps:g} (got {values})")
                concrete[GRANULARITY_OPTION] = kept if isinstance(grid, list) and len(kept) > 1 else kept[0]
            # _build calls the builder at once, inside this iteration
            for value in _as_list(concrete.get(GRANULARITY_OPTION, [])):
                _build(check, key, lambda v=value: create_method(method, eps, **{**concrete, GRANULARITY_OPTION: v}))  # noqa: B023
            if GRANULARITY_OPTION not in concrete:
                _build(check, key, lambda: create_method(method, eps, **concrete))  # noqa: B023
            cell_label = label + "".join(f"[{o}={_fmt(v)}]" for o, v in combo)
            cell_id = f"{dataset}_{model}_eps{eps:g}_{label}" + "".join(f"_{o}{_fmt(v)}" for o, v in combo) + \
                f"_s{seed}"
            params = {
                "dataset": dataset, "model": model, "eps": float(eps), "seed": int(seed), "label": cell_label,
                "entry": label, "method": method, "method_options": concrete, "train": dict(train),
                "verify": verify, "export": export, "limits": {**limits, **cap_override},
                "resize": data_table["resize"],
                "data_root": data_table["root"],
            }
            token = json.dumps({k: v for k, v in params.items() if k not in ("label", "entry")}, sort_keys=True)
            if token in seen or cell_id in {c.id for c in cells}:
                other = seen.get(token, cell_id)
                raise check.fail(key, f"duplicate cell {cell_id}: same dataset, model, eps, seed, method and "
                                 f"options as {other} (give the entries different options or drop one)")
            seen[token] = f"methods.{label}"
            cells.append(Cell(cell_id, params))
    if not cells:
        raise check.fail("grid", "the grid is empty (no cells)")
    return cells


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]
