"""Figures (matplotlib, Agg; each as PNG and PDF) from a suite store or run directories."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..rundir import read_csv, read_json
from .tables import aggregate, kind, verified_error, verifier_group


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    for path in paths:
        fig.savefig(path, bbox_inches="tight", dpi=150 if path.suffix == ".png" else None)
    _pyplot().close(fig)
    return paths


def _grid(count: int):
    plt = _pyplot()
    cols = min(3, max(1, count))
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    return fig, list(axes.flat)


def plot_error_vs_eps(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Verified error vs eps per method: AbsCert under both meanings, the others under their tightest bound."""
    rows = aggregate(rows)
    panels = sorted({(r["dataset"], r["model"]) for r in rows})
    if not panels:
        return []
    fig, axes = _grid(len(panels))
    all_series: dict[tuple[str, str], dict[str, list[tuple[float, float]]]] = {}
    for dataset, model in panels:
        series = all_series.setdefault((dataset, model), {})
        for r in (r for r in rows if (r["dataset"], r["model"]) == (dataset, model)):
            meanings = verifier_group("abscert") if kind(r) == "abscert" else ["best-bound"]
            for meaning in meanings:
                error = verified_error(r, meaning)
                if error is None:
                    continue
                name = r["label"] + {"abscert-paper": " (paper check)", "abscert-sound": " (sound)"}.get(meaning, "")
                series.setdefault(name, []).append((r["eps"], 100 * error))
    # one colour per series across all panels, so a colour means the same method everywhere
    names = sorted({name for series in all_series.values() for name in series})
    palette = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    for ax, (dataset, model) in zip(axes, panels):
        series = all_series[(dataset, model)]
        for name, points in sorted(series.items()):
            points.sort()
            style = "--" if "paper check" in name else "-"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=name,
                    color=colours[name])
        ax.set_title(f"{dataset} / {model}")
        ax.set_xlabel("ε")
        ax.set_ylabel("verified error %")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out_dir, "verified_error_vs_eps")


def plot_time_vs_parameters(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Training seconds per epoch vs parameter count, one line per method (scalability rows)."""
    series: dict[str, list[tuple[int, float, str]]] = {}
    for r in rows:
        if r.get("parameters") and r.get("train_s_per_epoch"):
            series.setdefault(r["label"], []).append((r["parameters"], r["train_s_per_epoch"], r["model"]))
    if not series:
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        for params, seconds, model in points:
            ax.annotate(model, (params, seconds), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("training s/epoch")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, out_dir, "train_time_vs_parameters")


def granularity_points(path: Path, rows: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Per (dataset/model/eps): paper-check accuracy vs d from granularity_search.csv files and from AbsCert rows."""
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for csv_path in sorted(Path(path).rglob("granularity_search.csv")):
        if ".staging" in csv_path.parts:
            continue
        config = read_json(csv_path.parent / "config.json")
        key = f"{config['dataset']} / {config['model']} / ε={config['eps']:g}"
        for row in read_csv(csv_path):
            if "pixel_d" in row:  # protocol official / clean: pixel d = 1/K, selected on the test or validation split
                name = f"{config.get('protocol', 'official')} search ({row['selection']} split)"
                curves.setdefault(key, {}).setdefault(name, []).append(
                    (float(row["pixel_d"]), float(row["selection_accuracy"])))
                continue
            curves.setdefault(key, {}).setdefault("search (validation split)", []).append(
                (float(row["d"]), float(row["validation_paper_accuracy"])))
    for r in aggregate(rows):
        match = re.search(r"d=([0-9.eE+-]+)", str(r["method"]))
        if kind(r) != "abscert" or match is None or "abscert-paper:verified_acc" not in r:
            continue
        key = f"{r['dataset']} / {r['model']} / ε={r['eps']:g}"
        curves.setdefault(key, {}).setdefault("trained cells (test split)", []).append(
            (float(match.group(1)), float(r["abscert-paper:verified_acc"])))
    return curves


def plot_accuracy_vs_granularity(path: Path, rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """AbsCert paper-check accuracy vs granularity d."""
    curves = granularity_points(path, rows)
    if not curves:
        return []
    fig, axes = _grid(len(curves))
    for ax, (key, series) in zip(axes, sorted(curves.items())):
        for name, points in sorted(series.items()):
            merged: dict[float, list[float]] = {}
            for d, acc in points:
                merged.setdefault(d, []).append(acc)
            xs = sorted(merged)
            ax.plot(xs, [100 * sum(merged[d]) / len(merged[d]) for d in xs], marker="o",
                    linestyle="--" if name.startswith("search") else "-", label=name)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("granularity d")
        ax.set_ylabel("paper-check accuracy %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out_dir, "paper_accuracy_vs_granularity")


def make_plots(path: str | Path, out_dir: str | Path) -> list[Path]:
    """Every figure that the data under `path` supports; returns the files written."""
    from .tables import load_rows, scalability_rows

    path, out_dir = Path(path), Path(out_dir)
    rows = load_rows(path)
    written = plot_error_vs_eps(rows, out_dir)
    if (path / "suite.json").exists():
        written += plot_time_vs_parameters(scalability_rows(path), out_dir)
    written += plot_accuracy_vs_granularity(path, rows, out_dir)
    return written
