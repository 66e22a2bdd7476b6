"""Comparison tables from run directories: one row per (run, eps), one column group per verifier meaning."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .errors import UserError
from .official import format_eps, mark_label, paper_eps, table_notes
from .rundir import read_csv, read_json

# Column titles by meaning (DESIGN.md: never conflate them).
VERIFIER_TITLES = {
    "abscert-paper": "AbsCert paper check (not sound)",
    "abscert-sound": "AbsCert sound (deployed f)",
    "ibp": "IBP bound",
    "crown": "CROWN bound",
    "alpha-crown": "α-CROWN bound",
    "pgd": "PGD (attack, upper bound)",
}
VERIFIER_ORDER = ["abscert-paper", "abscert-sound", "ibp", "crown", "alpha-crown", "pgd"]


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
    config = read_json(run_dir / "config.json")
    metrics = read_csv(run_dir / "metrics.csv")
    epoch_times = [float(m["train_time_s"]) for m in metrics]
    options = config.get("method_options") or {}
    protocol = config.get("protocol", "pixel")
    if protocol != "pixel":  # official / clean: our pixel d = 1/K and the paper's cell width 2/K
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
        fields = dict(part.split("=", 1) for part in eps_dir.name.split(","))
        row = {**base, "eps": float(fields["eps"])}
        if protocol != "pixel":
            row["paper_eps"] = paper_eps(row["eps"])
        for summary_path in sorted(eps_dir.glob("*.json")):
            summary = json.loads(summary_path.read_text())
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
    accepted = {r["index"] for r in read_csv(paper) if r["status"] == "verified"}
    falsified = {r["index"] for r in read_csv(sound) if r["status"] == "falsified"}
    return {"paper_accepted_sound_falsified": len(accepted & falsified)}


def collect(paths: list[Path]) -> list[dict[str, Any]]:
    """All rows of all runs under `paths`."""
    return [row for run in find_runs(paths) for row in run_rows(run)]


def verifier_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Verifier names present in the rows, in the canonical order (cascades last)."""
    present = {key.split(":samples")[0] for row in rows for key in row if key.endswith(":samples")}
    return [v for v in VERIFIER_ORDER if v in present] + sorted(present - set(VERIFIER_ORDER))


def _pct(value: Any) -> str:
    return "" if value is None or value == "" else f"{100 * float(value):.1f}"


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: accuracies in %, with each verifier's mean ms/sample beside it."""
    verifiers = verifier_columns(rows)
    headers = ["dataset", "model", "eps", "method", "samples", "clean acc %"]
    headers += [f"{VERIFIER_TITLES.get(v, v)} % (ms/sample)" for v in verifiers]
    has_gap = any("paper_accepted_sound_falsified" in r for r in rows)
    if has_gap:
        headers.append("paper-accepted, sound-falsified")
    headers.append("train s/epoch")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    def samples_of(row: dict[str, Any]) -> int:
        return max((row[k] for k in row if k.endswith(":samples")), default=0)

    for row in sorted(rows, key=lambda r: (r["dataset"], r["model"], r["eps"], r["method"], samples_of(r))):
        samples = samples_of(row) or "–"
        cells = [row["dataset"], row["model"], format_eps(row["eps"], row.get("protocol")),
                 mark_label(row["method"], row), str(samples), _pct(row["clean_acc"])]
        for v in verifiers:
            if f"{v}:samples" in row:
                cells.append(f"{_pct(row[f'{v}:verified_acc'])} ({row[f'{v}:ms_per_sample']:.1f})")
            else:
                cells.append("–")
        if has_gap:
            cells.append(str(row.get("paper_accepted_sound_falsified", "–")))
        cells.append(f"{row['train_s_per_epoch']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "Clean accuracy is on the whole test split; verifier columns on the first `samples` test images "
             "(a run verified on several prefixes has one row each). "
             "Meanings: "
             + "; ".join(f"**{VERIFIER_TITLES.get(v, v)}**" for v in verifiers) + " (see README).",
             "PGD can only falsify: its column is the attack's accuracy, an upper bound on robust accuracy."]
    notes += table_notes(rows)
    return "\n".join(lines + notes) + "\n"


def to_csv_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows and the union of their columns, fixed columns first."""
    fixed = ["dataset", "model", "eps", "method", "run", "train_eps", "epochs", "clean_acc", "train_s_per_epoch"]
    if any("protocol" in r for r in rows):  # official / clean rows: eps in the paper's units beside it, and selection
        fixed[3:3] = ["paper_eps", "protocol", "selection"]
    extra = sorted({k for r in rows for k in r} - set(fixed))
    return rows, fixed + extra
