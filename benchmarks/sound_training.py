"""Headline table of the sound-training store (issue 14): does abstraction help verified training once it is sound?

    python benchmarks/sound_training.py results/sound-training [--out results/sound-training/headline.md]

Per dataset and eps, every method's row from the committed store: clean error, *sound* verified error (AbsCert-style
models: `abscert-sound` on the deployed classifier N(phi(·)); baselines: their tightest sound bound among IBP / CROWN
/ α-CROWN run on the same images), the images it was measured on, and training time (the train stage's wall
seconds, a granularity search included; and the final model's own training seconds). Then the issue's target per
(dataset, eps): the best AbsCert-style method at or below the best baseline's sound verified error, with at most
half its training time. Figures are read from the store, never typed in.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from abscert_bench.harness.tables import best_bound_verifier, kind, load_rows, verified_error


def sound_error(row: dict) -> tuple[float | None, str]:
    """(sound verified error, its verifier): abscert-sound for AbsCert-style rows, else the tightest bound."""
    if kind(row) == "abscert":
        return verified_error(row, "abscert-sound"), "abscert-sound"
    verifier = best_bound_verifier(row)
    return (None, "–") if verifier is None else (verified_error(row, verifier), verifier)


def stage_seconds(store: Path, cell: str) -> float:
    """Wall seconds of the cell's train stage (every training it ran, a d search's included)."""
    result = json.loads((store / "cells" / cell / "result.json").read_text())
    return float(result["stages"]["train"]["seconds"])


def report(store: Path) -> str:
    rows = [r for r in load_rows(store) if kind(r) in ("abscert", "baseline")]
    out = [f"# Sound training head-to-head (`{store}`)", "",
           "Sound verified error: AbsCert-style rows by `abscert-sound` (the deployed classifier N(phi(·)) on the "
           "whole clipped L∞ ball; unknown counts as not verified), baselines by their tightest sound bound "
           "(auto_LiRPA) on the same images. Train s: the train stage's wall time (a granularity search "
           "included), final: the final model's training alone. Figures from the store's result.json files.", ""]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["model"], float(row["eps"])), []).append(row)
    verdicts = []
    for (dataset, model, eps), members in sorted(groups.items()):
        out += [f"## {dataset} {model}, eps {eps:g}", "",
                "| method | kind | clean err % | sound verified err % | by | images | sound falsified | unknown | "
                "train s | final s | epochs |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        scored = []
        for row in sorted(members, key=lambda r: (kind(r) != "baseline", r["label"])):
            error, by = sound_error(row)
            seconds = stage_seconds(store, row["cell"])
            falsified = row.get(f"{by}:falsified", "–")
            unknown = row.get(f"{by}:unknown", "–")
            out.append(f"| {row['label']} | {kind(row)} | {100 * (1 - row['clean_acc']):.1f} | "
                       f"{'–' if error is None else f'{100 * error:.1f}'} | {by} | {row.get(f'{by}:samples', '–')} | "
                       f"{falsified} | {unknown} | {seconds:.0f} | {row['train_s']:.0f} | {row['epochs']} |")
            if error is not None:
                scored.append((error, seconds, row))
        out.append("")
        baselines = [s for s in scored if kind(s[2]) == "baseline"]
        ours = [s for s in scored if kind(s[2]) == "abscert"]
        if baselines and ours:
            base = min(baselines, key=lambda s: (s[0], s[1]))
            meeting = [s for s in ours if s[0] <= base[0] and s[1] <= base[1] / 2]
            best = min(meeting or ours, key=lambda s: (s[0], s[1]))  # the best method meeting both, else the best
            met = bool(meeting)
            verdicts.append(
                f"| {dataset} | {eps:g} | {best[2]['label']} | {100 * best[0]:.1f} | {best[1]:.0f} | "
                f"{base[2]['label']} | {100 * base[0]:.1f} | {base[1]:.0f} | {base[1] / max(best[1], 1e-9):.1f} | "
                f"{'met' if met else 'missed'} |")
    out += ["## Target: best AbsCert-style method vs best baseline", "",
            "| dataset | eps | AbsCert-style (best meeting the target, else best) | sound err % | train s | "
            "best baseline | sound err % | train s | "
            "time ratio | target (err ≤ baseline, time ≤ ½) |",
            "|---|---|---|---|---|---|---|---|---|---|", *verdicts, ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown here (default: print it)")
    args = parser.parse_args()
    text = report(args.store)
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
