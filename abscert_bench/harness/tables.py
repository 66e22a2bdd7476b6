"""Paper-style comparison tables (Markdown and LaTeX/booktabs) from a suite store or from run directories.

Rows come from `abscert_bench.table.collect` (one per run and verified eps); this module only groups them
(mean over seeds), turns accuracies into errors and compares AbsCert with the best baseline:

* a **baseline** is any trained method other than `natural` and AbsCert; its verified error is the lowest
  over the sound bound verifiers run on it (IBP, CROWN, α-CROWN — all sound, so the tightest one counts);
  the best baseline of a (dataset, model, eps) is the one with the lowest such error;
* for each AbsCert meaning — `abscert-paper` (the published, unsound check) and `abscert-sound` — the best
  AbsCert row under that meaning is compared with the best baseline:
  relative reduction = (E_baseline − E_abscert) / E_baseline, speed-up = baseline s/epoch ÷ AbsCert s/epoch.
  A bound verifier run on fewer images than the row (a per-verifier `limit`) is left out of that minimum.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..official import TEST_SELECTION_MARK, format_eps, mark_label, table_notes
from ..table import collect

MEANINGS = ["abscert-paper", "abscert-sound", "ibp", "crown", "alpha-crown"]
BOUND_VERIFIERS = ["ibp", "crown", "alpha-crown"]
ABSCERT_MEANINGS = ["abscert-paper", "abscert-sound"]
TITLES = {"abscert-paper": "AbsCert paper", "abscert-sound": "AbsCert sound", "ibp": "IBP", "crown": "CROWN",
          "alpha-crown": "α-CROWN"}
LATEX_TITLES = {**TITLES, "alpha-crown": r"$\alpha$-CROWN"}


# -- rows -----------------------------------------------------------------------------------------------------------
def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a suite store (complete cells, annotated with the spec's labels and seeds) or of run directories."""
    path = Path(path)
    if not (path / "suite.json").exists():
        rows = collect([path])
        return [{**r, "label": r["method"], "seed": 0} for r in rows]
    from .store import Store

    rows = []
    for cell_dir, result in Store(path).results():
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
    ran = [v for v in BOUND_VERIFIERS if row.get(f"{v}:verified_acc") is not None]
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
        for meaning in ABSCERT_MEANINGS:
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
    return [m for m in MEANINGS if m in present]


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
        [f"{TITLES[m]} err % (ms/sample)" for m in meanings] + ["paper ✓ / sound ✗", "train s/epoch"]
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
            e["dataset"], e["model"], format_eps(e["eps"], e.get("protocol")), TITLES[e["meaning"]], e["abscert"],
            _pct(e["abscert_error"]),
            f"{e['baseline']} ({TITLES.get(e['baseline_verifier'] or '', '–')})" if e["baseline"] else "–",
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


def to_latex(rows: list[dict[str, Any]]) -> str:
    """Both tables as LaTeX tabulars with booktabs rules (\\usepackage{booktabs})."""
    rows = aggregate(rows)
    meanings = _meanings_present(rows)
    n = len(meanings)
    out = [r"% generated by abscert-bench run-table; needs \usepackage{booktabs}",
           r"\begin{tabular}{llrl r" + " r" * n + " r r}", r"\toprule",
           r" & & & & \multicolumn{1}{c}{clean} & \multicolumn{" + str(n) +
           r"}{c}{verified error \% (ms/sample)} & paper$\checkmark$ & train \\",
           r"\cmidrule(lr){6-" + str(5 + n) + "}",
           "Dataset & Model & $\\epsilon$ & Method & err \\% & " +
           " & ".join(LATEX_TITLES[m] for m in meanings) + r" & sound$\times$ & s/epoch \\", r"\midrule"]
    previous = None
    for row in rows:
        key = (row["dataset"], row["model"], row["eps"])
        if previous is not None and key != previous:
            out.append(r"\midrule")
        previous = key
        cells = [latex_escape(row["dataset"]), latex_escape(row["model"]), format_eps(row["eps"], row.get("protocol")),
                 latex_escape(mark_label(row["label"], row)), latex_escape(_clean(row))]
        cells += [latex_escape(c) if c in ("–", "stopped") else c
                  for c in _main_cells(row, meanings, lambda err, ms: f"{err} {{\\scriptsize({ms})}}")]
        cells += [latex_escape(_gap(row)), _num(row["train_s_per_epoch"])]
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    out += [r"\par{\footnotesize " + latex_escape(n) + "}" for n in table_notes(rows)]
    out += [f"% {latex_escape(n)}" for n in _stop_notes(rows) + _resized_notes(rows)]
    entries = comparisons(rows)
    out += ["", r"\begin{tabular}{llrllrlrrrrr}", r"\toprule",
            r" & & & \multicolumn{3}{c}{AbsCert (best)} & \multicolumn{2}{c}{best baseline} & "
            r"rel.\ reduction & \multicolumn{2}{c}{s/epoch} & speed-up \\",
            r"\cmidrule(lr){4-6}\cmidrule(lr){7-8}\cmidrule(lr){10-11}",
            r"Dataset & Model & $\epsilon$ & meaning & method & err \% & method (verifier) & err \% & "
            r"of verified err \% & AbsCert & baseline & $\times$ \\", r"\midrule"]
    for e in entries:
        out.append(" & ".join([
            latex_escape(e["dataset"]), latex_escape(e["model"]), format_eps(e["eps"], e.get("protocol")),
            LATEX_TITLES[e["meaning"]],
            latex_escape(e["abscert"]), _pct(e["abscert_error"]).replace("–", "--"),
            latex_escape(e["baseline"] or "–") + (f" ({LATEX_TITLES.get(e['baseline_verifier'] or '', '--')})"
                                                  if e["baseline"] else ""),
            _pct(e["baseline_error"]).replace("–", "--"), _pct(e["reduction"]).replace("–", "--"),
            _num(e["abscert_s_per_epoch"]).replace("–", "--"), _num(e["baseline_s_per_epoch"]).replace("–", "--"),
            _num(e["speedup"]).replace("–", "--"),
        ]) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(out)


# -- scalability ----------------------------------------------------------------------------------------------------
def scalability_rows(store_root: str | Path) -> list[dict[str, Any]]:
    """Per cell (any status): parameters, s/epoch, peak memory, ms/sample per verifier, and where it stopped."""
    from .store import Store

    rows = []
    for _, result in Store(store_root).results():
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
    verifiers = [m for m in MEANINGS + ["pgd"] if any(f"{m}:ms_per_sample" in r or f"{m}:stopped" in r
                                                        for r in rows)]
    headers = ["dataset", "model", "parameters", "method", "status", "train s/epoch", "train peak RSS MiB"] + \
        [f"{TITLES.get(v, v)} ms/sample" for v in verifiers] + ["stops at"]
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
