"""Comparison tables (Markdown, CSV, LaTeX/booktabs) from run directories or a suite store: the one table module.

Rows come from `collect` (one per run directory and verified eps). Two renderings:

* the **run-directory table** (`abscert-bench table`, `compare`, `demo`): `runs_markdown` and `write_rows_csv`,
  one row per (run, eps), accuracies in %, each verifier under its long title (its meaning);
* the **paper tables** (`abscert-bench run`, `run-table`): `to_markdown` and `to_latex` group the rows (mean over
  seeds), turn accuracies into errors and compare AbsCert with the best baseline:

  * a **baseline** is any trained method other than `natural` and AbsCert; its verified error is the lowest
    over the sound bound verifiers run on it (group `bound`: IBP, CROWN, α-CROWN — all sound, so the tightest
    one counts); the best baseline of a (dataset, model, eps) is the one with the lowest such error;
  * for each AbsCert meaning (group `abscert`: `abscert-paper`, the published, unsound check, and
    `abscert-sound`) the best AbsCert row under that meaning is compared with the best baseline:
    relative reduction = (E_baseline − E_abscert) / E_baseline, speed-up = baseline s/epoch ÷ AbsCert s/epoch.
    A bound verifier run on fewer images than the row (a per-verifier `limit`) is left out of that minimum.

Verifier titles, column order and groups are the verifiers' registered metadata (`VERIFIERS.meta(name)`,
abscert_bench.verification.base.VerifierMeta), declared where each verifier is registered.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..official import TEST_SELECTION_MARK, format_eps, mark_label, paper_eps, table_notes
from ..validate import (
    check_fields,
    float_field,
    is_int,
    is_number,
    read_csv_file,
    read_json_file,
    read_run_config,
    read_verifier_summary,
)


def _meta(name: str):
    """The registered metadata of verifier `name` (defaults for a cascade); imported here, not at the top: torch."""
    from ..verification.base import verifier_meta

    return verifier_meta(name)


VERIFIER_GROUPS = ("abscert", "bound", "attack", "other")  # as abscert_bench.verification.base.VERIFIER_GROUPS


def verifier_group(*groups: str) -> list[str]:
    """Registered verifiers of these groups, in their registered order."""
    from ..verification.base import verifiers_in_group

    return verifiers_in_group(*groups)


# -- rows from run directories --------------------------------------------------------------------------------------
def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories (holding config.json) at or below the given paths, sorted."""
    runs: set[Path] = set()
    for path in paths:
        if not path.exists():
            raise UserError(f"no such run directory {path}")
        if (path / "config.json").exists():
            runs.add(path)
        runs.update(p.parent for p in path.rglob("config.json") if (p.parent / "metrics.csv").exists())
    if not runs:
        raise UserError(f"no run directories (with config.json and metrics.csv) under {', '.join(map(str, paths))}")
    return sorted(runs)


def run_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Table rows of one run: one per verified eps (or one without verification)."""
    config = read_run_config(run_dir)
    metrics_path = run_dir / "metrics.csv"
    metrics = read_csv_file(metrics_path)
    epoch_times = [float_field(m, "train_time_s", metrics_path, i) for i, m in enumerate(metrics, start=2)]
    for i, m in enumerate(metrics, start=2):
        float_field(m, "test_acc", metrics_path, i)
    options = config.get("method_options") or {}
    protocol = config.get("protocol", "pixel")
    if protocol != "pixel":  # official / clean: our pixel d = 1/K and the paper's cell width 2/K
        if not is_int(config.get("cells")) or not is_number(options.get("d")):
            raise UserError(f"{run_dir / 'config.json'}: protocol {protocol} needs integer 'cells' and "
                            f"method_options.d")
        cells = int(config["cells"])
        method = f"{config['method']} ({protocol}, d={options['d']:.4g}=1/{cells}, paper η {2 / cells:.3g})"
    else:
        method = config["method"] + (f" (d={options['d']:g}, {options.get('variant', 'point')})"
                                     if "d" in options else "")
    selected = [m for m in metrics if str(m.get("selected", "")) == "1"]  # the deployed epoch (protocol runs)
    final = selected[0] if selected else (metrics[-1] if metrics else None)
    base = {
        "run": run_dir.name, "dataset": config["dataset"], "model": config["model"], "method": method,
        "train_eps": config["eps"], "epochs": len(metrics),
        "clean_acc": float(final["test_acc"]) if final else float("nan"),
        "train_s_per_epoch": statistics.mean(epoch_times) if epoch_times else float("nan"),
        "train_s": sum(epoch_times), "budget_s": float(config.get("budget_s") or 0.0),
    }
    if protocol != "pixel":
        base.update({"protocol": protocol, "selection": config.get("selection", "")})
    verify_root = run_dir / "verify"
    eps_dirs = sorted(verify_root.glob("eps=*")) if verify_root.exists() else []
    if not eps_dirs:
        return [{**base, "eps": config["eps"],
                 **({"paper_eps": paper_eps(config["eps"])} if protocol != "pixel" else {})}]
    rows = []
    for eps_dir in eps_dirs:
        try:
            fields = dict(part.split("=", 1) for part in eps_dir.name.split(","))
            row = {**base, "eps": float(fields["eps"])}
        except (ValueError, KeyError):
            raise UserError(f"{eps_dir}: not a results folder written by verify (expected eps=E or "
                            f"eps=E,first=N)") from None
        if protocol != "pixel":
            row["paper_eps"] = paper_eps(row["eps"])
        for summary_path in sorted(eps_dir.glob("*.json")):
            summary = read_verifier_summary(summary_path)
            name = summary["verifier"]
            row[f"{name}:samples"] = summary["samples"]
            row[f"{name}:verified_acc"] = (1 - summary["falsified_fraction"]) if summary.get("attack_only") \
                else summary["verified_fraction"]
            row[f"{name}:falsified"] = summary["falsified"]
            row[f"{name}:unknown"] = summary["unknown"]
            row[f"{name}:ms_per_sample"] = 1000 * summary["time_mean_s"]
        row.update(paper_vs_sound(eps_dir))
        rows.append(row)
    return rows


def paper_vs_sound(eps_dir: Path) -> dict[str, Any]:
    """Count of samples the paper check accepts but abscert-sound falsifies (when both were run)."""
    paper, sound = eps_dir / "abscert-paper.csv", eps_dir / "abscert-sound.csv"
    if not (paper.exists() and sound.exists()):
        return {}
    accepted = {r.get("index") for r in read_csv_file(paper) if r.get("status") == "verified"}
    falsified = {r.get("index") for r in read_csv_file(sound) if r.get("status") == "falsified"}
    return {"paper_accepted_sound_falsified": len(accepted & falsified)}


def collect(paths: list[Path]) -> list[dict[str, Any]]:
    """All rows of all runs under `paths`."""
    return [row for run in find_runs(paths) for row in run_rows(run)]


def verifier_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Verifier names present in the rows, in their registered order (cascades and unregistered ones last)."""
    from ..verification.base import VERIFIERS

    return VERIFIERS.ordered(key.split(":samples")[0] for row in rows for key in row if key.endswith(":samples"))


# -- the run-directory table (`table`, `compare`) -------------------------------------------------------------------
def _pct_or_blank(value: Any) -> str:
    return "" if value is None or value == "" else f"{100 * float(value):.1f}"


def runs_markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of run-directory rows: accuracies in %, with each verifier's mean ms/sample beside it."""
    verifiers = verifier_columns(rows)
    headers = ["dataset", "model", "eps", "method", "samples", "clean acc %"]
    headers += [f"{_meta(v).long_title} % (ms/sample)" for v in verifiers]
    has_gap = any("paper_accepted_sound_falsified" in r for r in rows)
    if has_gap:
        headers.append("paper-accepted, sound-falsified")
    headers.append("train s/epoch")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    def largest_sample(row: dict[str, Any]) -> int:
        return max((row[k] for k in row if k.endswith(":samples")), default=0)

    for row in sorted(rows, key=lambda r: (r["dataset"], r["model"], r["eps"], r["method"], largest_sample(r))):
        samples = largest_sample(row) or "–"
        cells = [row["dataset"], row["model"], format_eps(row["eps"], row.get("protocol")),
                 mark_label(row["method"], row), str(samples), _pct_or_blank(row["clean_acc"])]
        for v in verifiers:
            if f"{v}:samples" in row:
                cells.append(f"{_pct_or_blank(row[f'{v}:verified_acc'])} ({row[f'{v}:ms_per_sample']:.1f})")
            else:
                cells.append("–")
        if has_gap:
            cells.append(str(row.get("paper_accepted_sound_falsified", "–")))
        cells.append(f"{row['train_s_per_epoch']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "Clean accuracy is on the whole test split; verifier columns on the first `samples` test images "
             "(a run verified on several prefixes has one row each). "
             "Meanings: "
             + "; ".join(f"**{_meta(v).long_title}**" for v in verifiers) + " (see README).",
             "PGD can only falsify: its column is the attack's accuracy, an upper bound on robust accuracy."]
    notes += table_notes(rows)
    return "\n".join(lines + notes) + "\n"


def rows_frame(rows: list[dict[str, Any]]):
    """The rows as a pandas DataFrame, fixed columns first (then the others by name); a cell a row lacks is ''."""
    import pandas as pd

    fixed = ["dataset", "model", "eps", "method", "run", "train_eps", "epochs", "clean_acc", "train_s_per_epoch"]
    if any("protocol" in r for r in rows):  # official / clean rows: eps in the paper's units beside it, and selection
        fixed[3:3] = ["paper_eps", "protocol", "selection"]
    columns = fixed + sorted({k for r in rows for k in r} - set(fixed))
    return pd.DataFrame([[r.get(c, "") for c in columns] for r in rows], columns=columns, dtype=object)


def write_rows_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """The rows as CSV (`rows_frame`), written atomically."""
    from ..owned import write_output_file

    text = rows_frame(rows).to_csv(index=False, na_rep="nan", lineterminator="\r\n")
    write_output_file(path, text, "csv", "--csv")  # never over a file abscert-bench did not write


# -- the paper tables (`run`, `run-table`): rows of a store ------------------------------------------------------
def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a suite store (complete cells, annotated with the spec's labels and seeds) or of run directories."""
    path = Path(path)
    if not (path / "suite.json").exists():
        rows = collect([path])
        return [{**r, "label": r["method"], "seed": 0} for r in rows]
    from .store import Store

    store = Store(path)
    read_json_file(path / "suite.json")
    rows = []
    for cell_dir, result in checked_results(store):
        if result["status"] not in ("done", "stopped"):
            continue
        cell = result["cell"]
        if not (cell_dir / "run" / "metrics.csv").exists():
            train = result.get("stages", {}).get("train", {})
            if train.get("stopped"):  # training went over a cap: a row that says so, with no numbers
                rows.append({"label": cell["label"], "method": cell["method"], "seed": cell["seed"],
                             "cell": result["id"], "dataset": _dataset_label(cell), "model": cell["model"],
                             "eps": float(cell["eps"]), "train_eps": float(cell["eps"]), "clean_acc": float("nan"),
                             "train_s_per_epoch": train.get("s_per_epoch") or float("nan"),
                             "train_stopped": result.get("reason") or train["stopped"],
                             "resized": result.get("resized", "")})
            continue
        for row in collect([cell_dir / "run"]):
            row.update({"label": cell["label"], "seed": cell["seed"], "cell": result["id"],
                        "dataset": _dataset_label(cell), "resized": result.get("resized", "")})
            for stage, info in result.get("stages", {}).items():
                if stage.startswith("verify:") and info.get("status") == "stopped":
                    row[f"{stage[7:]}:stopped"] = info.get("stopped", "stopped")
            rows.append(row)
    if not rows:
        raise UserError(f"no complete cells with results in {path}")
    return rows


CELL_KEYS = {"label": lambda v: isinstance(v, str), "method": lambda v: isinstance(v, str),
             "model": lambda v: isinstance(v, str), "dataset": lambda v: isinstance(v, str), "eps": is_number,
             "seed": is_int}


def checked_results(store: Any) -> list[tuple[Path, dict[str, Any]]]:
    """Every committed cell of a store with a well-formed result.json; a cell folder whose result.json is
    missing, corrupt or malformed is a UserError naming it (never skipped silently)."""
    results = dict(store.results())
    checked = []
    if store.cells_dir.exists():
        for cell_dir in sorted(p for p in store.cells_dir.iterdir()):
            path = cell_dir / "result.json"
            result = results.get(cell_dir)
            if result is None:
                raw = read_json_file(path) if cell_dir.is_dir() else None
                raise UserError(f"unreadable cell {path}: "
                                + ("not a cell folder" if raw is None else "status, id or run files do not match"))
            check_fields(result, path, {"id": lambda v: isinstance(v, str), "cell": lambda v: isinstance(v, dict)},
                         {"stages": lambda v: isinstance(v, dict)})
            check_fields(result["cell"], path, CELL_KEYS)
            for stage, info in (result.get("stages") or {}).items():
                if not isinstance(info, dict):
                    raise UserError(f"{path}: bad value for stage {stage!r}: {info!r}")
            checked.append((cell_dir, result))
    return checked


def _dataset_label(cell: dict[str, Any]) -> str:
    if cell.get("resize"):
        return cell["dataset"] + "→{}×{}×{}".format(*cell["resize"])
    return cell["dataset"]


def kind(row: dict[str, Any]) -> str:
    """'abscert', 'natural' or 'baseline' from the row's training method."""
    method = str(row["method"])
    if method.startswith("abscert"):
        return "abscert"
    return "natural" if method.startswith("natural") else "baseline"


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over seeds of rows sharing (dataset, model, eps, label); `seeds` counts them."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["model"], float(row["eps"]), row.get("label", row["method"])),
                          []).append(row)
    out = []
    for (dataset, model, eps, label), members in sorted(groups.items(), key=lambda kv: kv[0]):
        merged: dict[str, Any] = {"dataset": dataset, "model": model, "eps": eps, "label": label,
                                  "method": members[0]["method"], "seeds": len(members),
                                  "resized": members[0].get("resized", "")}
        keys = {k for m in members for k in m} - set(merged) - {"run", "cell", "seed"}
        for key in keys:
            values = [m[key] for m in members if key in m]
            numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            merged[key] = statistics.mean(numbers) if numbers and len(numbers) == len(values) else values[0]
        out.append(merged)
    return out


def verified_error(row: dict[str, Any], meaning: str) -> float | None:
    """1 − verified accuracy under `meaning` ('best-bound': the lowest over IBP/CROWN/α-CROWN), or None."""
    if meaning == "best-bound":
        errors = [e for e in (verified_error(row, v) for v in comparable_bounds(row)) if e is not None]
        return min(errors) if errors else None
    value = row.get(f"{meaning}:verified_acc")
    return None if value is None else 1.0 - float(value)


def comparable_bounds(row: dict[str, Any]) -> list[str]:
    """The bound verifiers run on the row's full set of images (a verifier limited to a shorter prefix, such as
    α-CROWN on the first 10, is not compared with the others); all of them when no counts are recorded."""
    full = samples_of(row)
    ran = [v for v in verifier_group("bound") if row.get(f"{v}:verified_acc") is not None]
    same = [v for v in ran if full is None or row.get(f"{v}:samples") in (None, full)]
    return same or ran


def best_bound_verifier(row: dict[str, Any]) -> str | None:
    """The bound verifier giving the row's lowest verified error."""
    candidates = [(verified_error(row, v), v) for v in comparable_bounds(row) if verified_error(row, v) is not None]
    return min(candidates)[1] if candidates else None


def comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dataset, model, eps) and AbsCert meaning: best baseline vs best AbsCert, reduction and speed-up."""
    out = []
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in aggregate(rows) if rows and "seeds" not in rows[0] else rows:
        groups.setdefault((row["dataset"], row["model"], row["eps"]), []).append(row)
    for (dataset, model, eps), members in sorted(groups.items()):
        baselines = [r for r in members if kind(r) == "baseline" and verified_error(r, "best-bound") is not None]
        base = min(baselines, key=lambda r: (verified_error(r, "best-bound"), r["train_s_per_epoch"]), default=None)
        for meaning in verifier_group("abscert"):
            candidates = [r for r in members if kind(r) == "abscert" and verified_error(r, meaning) is not None]
            if not candidates:
                continue
            best = min(candidates, key=lambda r: (verified_error(r, meaning), r["train_s_per_epoch"]))
            entry: dict[str, Any] = {
                "dataset": dataset, "model": model, "eps": eps, "meaning": meaning,
                "abscert": mark_label(best["label"], best), "protocol": best.get("protocol"),
                "selection": best.get("selection"),
                "abscert_error": verified_error(best, meaning), "abscert_s_per_epoch": best["train_s_per_epoch"],
                "baseline": None, "baseline_verifier": None, "baseline_error": None, "baseline_s_per_epoch": None,
                "baseline_clean_error": None, "reduction": None, "speedup": None,
            }
            if base is not None:
                e_base = verified_error(base, "best-bound")
                assert e_base is not None  # base is chosen among the rows with a best-bound error
                entry.update({"baseline": base["label"], "baseline_verifier": best_bound_verifier(base),
                              "baseline_error": e_base, "baseline_s_per_epoch": base["train_s_per_epoch"],
                              "baseline_clean_error": 1 - base["clean_acc"]})
                if e_base > 0:
                    entry["reduction"] = (e_base - entry["abscert_error"]) / e_base
                if entry["abscert_s_per_epoch"] and entry["abscert_s_per_epoch"] > 0:
                    entry["speedup"] = base["train_s_per_epoch"] / entry["abscert_s_per_epoch"]
            out.append(entry)
    return out


# -- formatting -----------------------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _meanings_present(rows: list[dict[str, Any]]) -> list[str]:
    present = {k.split(":")[0] for r in rows for k in r if k.endswith((":verified_acc", ":stopped"))}
    return [m for m in verifier_group("abscert", "bound", "other") if m in present]  # attacks are no column here


def samples_of(row: dict[str, Any]) -> int | None:
    """The number of test images most of the row's verifiers ran on (the largest count)."""
    counts = [int(v) for k, v in row.items() if k.endswith(":samples") and v is not None]
    return max(counts) if counts else None


def _main_cells(row: dict[str, Any], meanings: list[str], ms_format) -> list[str]:
    """One cell per meaning: error and ms/sample, `n=N` where that verifier saw fewer images than the row."""
    cells = []
    full = samples_of(row)
    for meaning in meanings:
        if f"{meaning}:stopped" in row and f"{meaning}:verified_acc" not in row:
            cells.append("stopped")
        elif f"{meaning}:verified_acc" in row:
            n = row.get(f"{meaning}:samples")
            ms = _num(row.get(f"{meaning}:ms_per_sample"), 1) + (f"; n={int(n)}" if n and full and n < full else "")
            cells.append(ms_format(_pct(verified_error(row, meaning)), ms))
        else:
            cells.append("–")
    return cells


def _clean(row: dict[str, Any]) -> str:
    return "stopped" if row.get("train_stopped") else _pct(1 - row["clean_acc"])


def _stop_notes(rows: list[dict[str, Any]]) -> list[str]:
    """One line per row whose training went over a cap."""
    return [f"Stopped — {r['dataset']} {r['model']} ε={r['eps']:g} {r['label']}: {r['train_stopped']}."
            for r in rows if r.get("train_stopped")]


def _gap(row: dict[str, Any]) -> str:
    value = row.get("paper_accepted_sound_falsified")
    return "–" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The comparison table and the AbsCert-vs-best-baseline summary, in Markdown."""
    rows = aggregate(rows)
    meanings = _meanings_present(rows)
    headers = ["dataset", "model", "ε", "method", "seeds", "clean err %", "verified on"] + \
        [f"{_meta(m).title} err % (ms/sample)" for m in meanings] + ["paper ✓ / sound ✗", "train s/epoch"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        n = samples_of(row)
        cells = [row["dataset"], row["model"], format_eps(row["eps"], row.get("protocol")),
                 mark_label(row["label"], row), str(row["seeds"]), _clean(row), str(n) if n else "–"]
        cells += _main_cells(row, meanings, lambda err, ms: f"{err} ({ms})")
        cells += [_gap(row), _num(row["train_s_per_epoch"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Verified error = 1 − verified accuracy on the first *verified on* test images (mean over "
              "seeds); `n=N` marks a verifier run on fewer images. Clean error is on the whole test split. "
              "*AbsCert paper* is the published check (not sound); *AbsCert sound* verifies the deployed "
              "classifier; IBP / CROWN / α-CROWN bound the standard models. "
              "*paper ✓ / sound ✗*: samples the paper check accepts but the sound check falsifies. "
              "*stopped*: the stage went over the spec's time or memory cap."]
    lines += table_notes(rows)
    lines += budget_notes(rows)
    lines += _stop_notes(rows)
    lines += _resized_notes(rows)
    lines += ["", summary_markdown(rows)]
    return "\n".join(lines) + "\n"


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    """AbsCert against the best baseline, separately for the paper and the sound meaning."""
    entries = comparisons(aggregate(rows) if rows and "seeds" not in rows[0] else rows)
    headers = ["dataset", "model", "ε", "AbsCert meaning", "AbsCert (best)", "AbsCert verified err %",
               "best baseline (verifier)", "baseline clean err %", "baseline verified err %", "relative reduction %",
               "AbsCert s/epoch", "baseline s/epoch", "training speed-up ×"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for e in entries:
        lines.append("| " + " | ".join([
            e["dataset"], e["model"], format_eps(e["eps"], e.get("protocol")), _meta(e["meaning"]).title, e["abscert"],
            _pct(e["abscert_error"]),
            f"{e['baseline']} ({_meta(e['baseline_verifier']).title if e['baseline_verifier'] else '–'})"
            if e["baseline"] else "–",
            _pct(e["baseline_clean_error"]), _pct(e["baseline_error"]), _pct(e["reduction"]),
            _num(e["abscert_s_per_epoch"]),
            _num(e["baseline_s_per_epoch"]), _num(e["speedup"]),
        ]) + " |")
    lines += ["", "Relative reduction = (E_baseline − E_AbsCert) / E_baseline of verified error; speed-up = baseline "
              "s/epoch ÷ AbsCert s/epoch. The best baseline is the certified-training baseline with the lowest "
              "verified error under its tightest sound bound; each meaning picks its own best AbsCert row. "
              "Only the *AbsCert sound* rows compare like with like: the paper check is not a sound verifier. "
              "A baseline whose clean error is near chance did not train at the spec's budget: its row says "
              "nothing about the method."]
    return "\n".join(lines)


def budget_notes(rows: list[dict[str, Any]]) -> list[str]:
    """One line saying which comparison the table makes: equal wall-clock budget or each method's own epochs."""
    trained = [r for r in rows if not r.get("train_stopped") and r.get("epochs")]
    if not trained:
        return []
    budgets = sorted({float(r.get("budget_s") or 0.0) for r in trained})
    if budgets == [0.0]:
        epochs: dict[str, set[int]] = {}
        for r in trained:
            epochs.setdefault(str(r["label"]), set()).add(int(round(float(r["epochs"]))))
        listed = ", ".join(f"{label} {'/'.join(str(e) for e in sorted(values))}"
                           for label, values in sorted(epochs.items()))
        return [f"Budget — equal recipes, not equal time: each method trains for its own epochs ({listed}; "
                f"the final model's epochs, an AbsCert d search's other models not counted); "
                f"*train s/epoch* gives the cost."]
    if 0.0 in budgets:
        return ["Budget — mixed: some rows had a wall-clock training budget (train.budget_s), others trained "
                "for their epochs; compare within one kind only."]
    return [f"Budget — equal wall-clock training budget: {'/'.join(f'{b:g}' for b in budgets)} s of training "
            f"per model (evaluation excluded), every schedule stretched to it; epochs differ by method."]


def _resized_notes(rows: list[dict[str, Any]]) -> list[str]:
    notes = sorted({f"{r['dataset']}: {r['resized']}" for r in rows if r.get("resized")})
    return [f"Note — {n}." for n in notes]


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "→": r"$\to$", "×": r"$\times$",
                  "ε": r"$\epsilon$", "α": r"$\alpha$", "–": "--", TEST_SELECTION_MARK: r"$^\dagger$",
                  "η": r"$\eta$"}


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters (and map the few Unicode symbols the tables use)."""
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def latex_title(name: str) -> str:
    """Verifier `name`'s LaTeX title (its registered `latex_title`, else its title escaped)."""
    meta = _meta(name)
    return meta.latex_title or latex_escape(meta.title)


def booktabs(columns: list[tuple[str, str]], body: list[list[str]], column_format: str,
             underline: tuple[str, ...] = (), breaks: tuple[int, ...] = ()) -> list[str]:
    r"""A booktabs tabular rendered by pandas' Styler from cells that are LaTeX already: two header rows from the
    (group, title) columns, a \cmidrule under each group in `underline`, a \midrule before each row in `breaks`."""
    import pandas as pd

    frame = pd.DataFrame(body, columns=pd.MultiIndex.from_tuples(columns), dtype=object)
    lines = frame.style.hide(axis="index").to_latex(
        hrules=True, column_format=column_format, multicol_align="c").rstrip("\n").split("\n")
    assert lines[1] == r"\toprule" and lines[4] == r"\midrule", lines[:5]  # \begin, \toprule, 2 header rows
    rules, start = "", 0
    while start < len(columns):
        stop = start
        while stop + 1 < len(columns) and columns[stop + 1][0] == columns[start][0]:
            stop += 1
        if columns[start][0] in underline:
            rules += rf"\cmidrule(lr){{{start + 1}-{stop + 1}}}"
        start = stop + 1
    body_lines = lines[5:-2]
    rows = [line for i, row in enumerate(body_lines) for line in ([r"\midrule"] if i in breaks else []) + [row]]
    return lines[:3] + ([rules] if rules else []) + lines[3:5] + rows + lines[-2:]


def to_latex(rows: list[dict[str, Any]]) -> str:
    """Both tables as LaTeX tabulars with booktabs rules (\\usepackage{booktabs})."""
    rows = aggregate(rows)
    meanings = _meanings_present(rows)
    verified = r"verified error \% (ms/sample)"
    columns = [("", "Dataset"), ("", "Model"), ("", r"$\epsilon$"), ("", "Method"), ("clean", r"err \%")]
    columns += [(verified, latex_title(m)) for m in meanings]
    columns += [(r"paper$\checkmark$", r"sound$\times$"), ("train", "s/epoch")]
    body, breaks = [], []
    previous = None
    for i, row in enumerate(rows):
        key = (row["dataset"], row["model"], row["eps"])
        if previous is not None and key != previous:
            breaks.append(i)
        previous = key
        cells = [latex_escape(row["dataset"]), latex_escape(row["model"]), format_eps(row["eps"], row.get("protocol")),
                 latex_escape(mark_label(row["label"], row)), latex_escape(_clean(row))]
        cells += [latex_escape(c) if c in ("–", "stopped") else c
                  for c in _main_cells(row, meanings, lambda err, ms: f"{err} {{\\scriptsize({ms})}}")]
        cells += [latex_escape(_gap(row)), _num(row["train_s_per_epoch"])]
        body.append(cells)
    out = [r"% generated by abscert-bench run-table; needs \usepackage{booktabs}"]
    out += booktabs(columns, body, "llrlr" + "r" * len(meanings) + "rr", underline=(verified,),
                    breaks=tuple(breaks))
    out += [r"\par{\footnotesize " + latex_escape(n) + "}" for n in table_notes(rows)]
    out += [f"% {latex_escape(n)}" for n in _stop_notes(rows) + _resized_notes(rows)]
    abscert, baseline, epoch = "AbsCert (best)", "best baseline", "s/epoch"

    def baseline_title(e: dict[str, Any]) -> str:
        return latex_title(e["baseline_verifier"]) if e["baseline_verifier"] else "--"

    columns = [("", "Dataset"), ("", "Model"), ("", r"$\epsilon$"), (abscert, "meaning"), (abscert, "method"),
               (abscert, r"err \%"), (baseline, "method (verifier)"), (baseline, r"err \%"),
               (r"rel.\ reduction", r"of verified err \%"), (epoch, "AbsCert"), (epoch, "baseline"),
               ("speed-up", r"$\times$")]
    body = [[
        latex_escape(e["dataset"]), latex_escape(e["model"]), format_eps(e["eps"], e.get("protocol")),
        latex_title(e["meaning"]),
        latex_escape(e["abscert"]), _pct(e["abscert_error"]).replace("–", "--"),
        latex_escape(e["baseline"] or "–") + (f" ({baseline_title(e)})" if e["baseline"] else ""),
        _pct(e["baseline_error"]).replace("–", "--"), _pct(e["reduction"]).replace("–", "--"),
        _num(e["abscert_s_per_epoch"]).replace("–", "--"), _num(e["baseline_s_per_epoch"]).replace("–", "--"),
        _num(e["speedup"]).replace("–", "--"),
    ] for e in comparisons(rows)]
    out += [""] + booktabs(columns, body, "llrllrlrrrrr", underline=(abscert, baseline, epoch)) + [""]
    return "\n".join(out)


# -- scalability ----------------------------------------------------------------------------------------------------
def scalability_rows(store_root: str | Path) -> list[dict[str, Any]]:
    """Per cell (any status): parameters, s/epoch, peak memory, ms/sample per verifier, and where it stopped."""
    from .store import Store

    rows = []
    for _, result in checked_results(Store(store_root)):
        cell = result["cell"]
        train = result.get("stages", {}).get("train", {})
        row: dict[str, Any] = {
            "dataset": _dataset_label(cell), "model": cell["model"], "eps": cell["eps"], "label": cell["label"],
            "seed": cell["seed"], "parameters": result.get("parameters"), "status": result["status"],
            "train_s_per_epoch": train.get("s_per_epoch"), "train_peak_rss_mb": train.get("peak_rss_mb"),
            "train_cuda_peak_mb": train.get("cuda_peak_mb"), "resized": result.get("resized", ""),
            "reason": result.get("reason") or result.get("error") or "",
        }
        for stage, info in result.get("stages", {}).items():
            if stage.startswith("verify:"):
                name = stage[7:]
                row[f"{name}:ms_per_sample"] = info.get("ms_per_sample")
                row[f"{name}:peak_rss_mb"] = info.get("peak_rss_mb")
                if info.get("status") == "stopped":
                    row[f"{name}:stopped"] = info.get("stopped")
        rows.append(row)
    return rows


def scalability_markdown(rows: list[dict[str, Any]]) -> str:
    """Scalability: per model and method, cost of training and verification and where each method stops."""
    verifiers = [m for m in verifier_group(*VERIFIER_GROUPS) if any(f"{m}:ms_per_sample" in r or f"{m}:stopped" in r
                                                             for r in rows)]
    headers = ["dataset", "model", "parameters", "method", "status", "train s/epoch", "train peak RSS MiB"] + \
        [f"{_meta(v).title} ms/sample" for v in verifiers] + ["stops at"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["parameters"] or 0, r["model"], r["label"], r["seed"])):
        cells = [r["dataset"], r["model"], f"{r['parameters']:,}" if r["parameters"] else "–", r["label"],
                 r["status"], _num(r["train_s_per_epoch"]), _num(r["train_peak_rss_mb"], 0)]
        for v in verifiers:
            cells.append("stopped" if r.get(f"{v}:stopped") else _num(r.get(f"{v}:ms_per_sample"), 1))
        cells.append(r["reason"].splitlines()[0][:120] if r["status"] != "done" else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Peak RSS is the growth of the worker process's resident memory during training (CPU); on CUDA "
              "see `cuda_peak_mb` in each cell's result.json."]
    lines += _resized_notes(rows)
    return "\n".join(lines) + "\n"
