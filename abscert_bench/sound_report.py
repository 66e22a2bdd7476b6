"""Evidence table for `abscert-sound` results: paper vs sound counts and per-stage time percentiles."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .rundir import read_csv, read_json

STAGES = ("attack_s", "bounds_s", "bab_s")


def _percent(count: int, total: int) -> str:
    return f"{count} ({100 * count / total:.1f} %)" if total else "0"


def bracket(pairs: list[tuple[Any, Any]]) -> str:
    """'[lo, hi]': the medians, over samples, of a lower bound on each one's worst margin (`min_margin_lb`) and of the
    attack's lowest margin (`attack_margin`, an upper bound on it); '–' without any. For the `unknown` samples the gap
    says whether more time (a narrow bracket) or tighter bounds (a wide one, its lower end far below 0) would decide."""
    lows = [float(low) for low, _ in pairs if low not in (None, "")]
    highs = [float(high) for _, high in pairs if high not in (None, "")]
    return f"[{np.median(lows):.2f}, {np.median(highs):.2f}]" if lows and highs else "–"


def sound_report(results_dirs: list[Path]) -> str:
    """Markdown: per results directory (RUN/verify/eps=…), counts and median/p95 ms per stage and in total."""
    lines = ["| run | eps | samples | paper-verified | sound-verified | sound-falsified | unknown | "
             "paper-accepted, sound-falsified | " + " | ".join(f"{s[:-2]} ms median / p95" for s in STAGES)
             + " | total ms median / p95 | unknown: worst margin in (medians) |", "|" + "---|" * (10 + len(STAGES))]
    for directory in results_dirs:
        sound_csv = directory / "abscert-sound.csv"
        if not sound_csv.exists():
            raise UserError(f"no abscert-sound results in {directory}")
        sound = read_csv(sound_csv)
        paper_csv = directory / "abscert-paper.csv"
        paper = {r["index"]: r["status"] for r in read_csv(paper_csv)} if paper_csv.exists() else {}
        n = len(sound)
        status = [r["status"] for r in sound]
        gap = sum(paper.get(r["index"]) == "verified" and r["status"] == "falsified" for r in sound)
        cells = [directory.parent.parent.name, directory.name.split(",")[0].split("=")[1], str(n),
                 _percent(sum(paper.get(r["index"]) == "verified" for r in sound), n) if paper else "–",
                 _percent(status.count("verified"), n), _percent(status.count("falsified"), n),
                 _percent(status.count("unknown"), n), str(gap) if paper else "–"]
        for column in [f"detail_{s}" for s in STAGES] + ["time_s"]:
            ms = np.array([1000 * float(r.get(column) or 0.0) for r in sound])
            cells.append(f"{np.median(ms):.1f} / {np.percentile(ms, 95):.1f}" if n else "–")
        cells.append(bracket([(r.get("detail_min_margin_lb"), r.get("detail_attack_margin")) for r in sound
                              if r["status"] == "unknown"]))
        lines.append("| " + " | ".join(cells) + " |")
    meaning = read_json(results_dirs[0] / "abscert-sound.json")["meaning"] if results_dirs else ""
    return "\n".join(lines) + f"\n\nabscert-sound answers: {meaning}. Stage times are per sample " \
        "(0 for samples decided before the stage). The last column brackets the worst margin of the `unknown` " \
        "samples (N's lowest logit margin over their reachable abstract inputs): the median sound lower bound " \
        "(root bound, raised by branch and bound) and the median of the attack's lowest margin.\n"
