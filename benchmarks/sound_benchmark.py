"""Benchmark `abscert-sound` on MNIST: AbsCert (point variant) DM_Small / DM_Medium / DM_Large / CNN7.

    python benchmarks/sound_benchmark.py --model dm_medium [--config pixel|official] [--samples 2004]
        [--timeout 10] [--checkpoint PATH] [--json OUT.json]

Configurations (issue 10's targets):
  pixel    — pixel eps 0.1, d 0.2 (5 cells), the project's own AbsCert training (5 epochs, batch 128);
  official — the official protocol's paper-unit configuration: pixel eps 0.05 (paper eps 0.1), d = 1/9
             (K = 9 cells, the paper's η = 0.222), N with the fixed [-1, 1] normalisation, xavier init and
             the official recipe's optimiser settings (5 epochs here, not 10).
Trains the model unless --checkpoint names an existing one (a fresh model is saved there when the path is
given), then verifies the first --samples test images with the paper check and with abscert-sound and
prints per-stage times, decision counts, the unknown fraction and the process's peak resident memory.
`--json` appends one record (model, config, figures, machine) to a JSON list; `--report FILE.json` prints those
records as a markdown table (results/sound-benchmark/).
For the `unknown` samples it prints (and records) where their worst margin lies: the medians of the sound lower
bound (`min_margin_lb`) and of the attack's lowest margin (`attack_margin`), see `abscert_bench.sound_report.bracket`.
Targets (2 cores, 10 s timeout, all 2,004 test images): DM_Small median <= 30 ms, p95 <= 500 ms, unknown < 1 %;
DM_Medium median <= 300 ms, unknown < 3 %; DM_Large median <= 1 s, unknown < 5 %, peak memory <= 8 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from abscert_bench.data import load_dataset  # noqa: E402
from abscert_bench.official import recipe_for  # noqa: E402
from abscert_bench.sound.recheck import recheck_file, save_counterexamples  # noqa: E402
from abscert_bench.trained import load_checkpoint, save_checkpoint  # noqa: E402
from abscert_bench.training import create_method  # noqa: E402
from abscert_bench.training.loop import TrainConfig, evaluate, protocol_config, train_model, xavier_init  # noqa: E402
from abscert_bench.verification import create_verifier, summarize  # noqa: E402

try:
    from abscert_bench.sound_report import bracket
except ImportError:  # a "before" run over older package code (at_commit.py), which records no margins to bracket
    def bracket(pairs) -> str:  # type: ignore[misc]
        return "–"

CONFIGS = {  # name: (pixel eps, d, method options)
    "pixel": (0.1, 0.2, {}),
    "official": (0.05, 1.0 / 9.0, {"protocol": "official"}),
}


def get_model(args, dataset):
    """Load --checkpoint if it exists, else train the model (and save it to --checkpoint if given)."""
    if args.checkpoint and Path(args.checkpoint).exists():
        print(f"model: loaded {args.checkpoint}")
        return load_checkpoint(args.checkpoint)
    eps, d, options = CONFIGS[args.config]
    config = TrainConfig("mnist", args.model, "abscert", eps, epochs=args.epochs, batch_size=128,
                         method_options={"d": d, **options}, device=args.device)
    method = create_method("abscert", eps, d=d, variant="point", **options)
    init = None
    if args.config == "official":
        recipe = {**recipe_for("mnist", args.model), "epochs": args.epochs}
        method.configure(recipe, dataset.input_shape[0])
        config = protocol_config(config, recipe)
        init = xavier_init
    start = time.perf_counter()
    trained, _ = train_model(config, method, dataset.train_x, dataset.train_y, dataset.test_x, dataset.test_y,
                             dataset.num_classes, init=init,
                             on_epoch=lambda row: print(f"  epoch {row['epoch']}: test acc {row['test_acc']:.4f}",
                                                        flush=True))
    print(f"model: trained in {time.perf_counter() - start:.0f} s")
    if args.checkpoint:
        Path(args.checkpoint).parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(trained, Path(args.checkpoint))
    return trained


def median_ms(values) -> str:
    values = list(values)
    return f"{1000 * float(np.median(values)):7.1f}" if values else "      -"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def report(path: str) -> str:
    """A markdown table of the records in a --json file (one row per run, in the order they ran)."""
    records = json.loads(Path(path).read_text())
    head = ("| run | model | config | eps / d | timeout s | options | images | median ms | p95 ms | unknown | "
            "verified | falsified | paper-accepted, soundly falsified | unknown: worst margin in (medians) | "
            "peak MiB | wall s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        options = ", ".join(f"{k} {v}" for k, v in r["verifier_options"].items()) or "–"
        lines.append(
            f"| {r['label']} | {r['model']} | {r['config']} | {r['eps']:g} / {r['d']:.4g} | {r['timeout_s']:g} | "
            f"{options} | {r['samples']} | {r['median_ms']:.0f} | {r['p95_ms']:.0f} | {r['unknown']} "
            f"({r['unknown_pct']:.1f} %) | {r['verified']} | {r['falsified']} | "
            f"{r['paper_verified_sound_falsified']} | {r.get('unknown_margin_bracket', '–')} | "
            f"{r['peak_rss_mb']:.0f} | {r['wall_s']:.0f} |")
    machine = sorted({f"{r['machine']}, {r['threads']} torch threads" for r in records})
    return "\n".join(lines) + f"\n\nMachine: {'; '.join(machine)}.\n"


def main(argv=None) -> None:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--report":
        print(report(sys.argv[2]), end="")
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dm_small", help="dm_small, dm_medium, dm_large or cnn7")
    parser.add_argument("--config", default="pixel", choices=sorted(CONFIGS))
    parser.add_argument("--checkpoint", help="model checkpoint to load, or where to save a fresh one")
    parser.add_argument("--samples", type=int, default=2004, help="first N test images (default: all 2,004)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=10.0, help="per-sample time limit (s)")
    parser.add_argument("--bound-method", default="crown", choices=["crown", "alpha-crown"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--train-only", action="store_true", help="train (or load) the model and stop")
    parser.add_argument("--verifier-options", default="{}", help="extra abscert-sound options as JSON")
    parser.add_argument("--counterexamples", help="write counterexamples to this .npz and re-check them")
    parser.add_argument("--json", help="append this run's figures to a JSON list in this file")
    parser.add_argument("--label", default="", help="a name for this run in the --json record (e.g. before/after)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = load_dataset("mnist")
    trained = get_model(args, dataset)
    if args.train_only:
        return
    eps = CONFIGS[args.config][0]
    trained.network.to(args.device)
    x, y = dataset.test_x[:args.samples], dataset.test_y[:args.samples]
    print(f"clean accuracy (first {len(x)} test images): {evaluate(trained.classifier(), x, y):.4f}")
    print(f"torch threads: {torch.get_num_threads()}")

    paper = create_verifier("abscert-paper").verify(trained, x, y, eps)
    verifier = create_verifier("abscert-sound", timeout=args.timeout, bound_method=args.bound_method,
                               **json.loads(args.verifier_options))
    start = time.perf_counter()
    results = verifier.verify(trained, x, y, eps, batch_size=args.batch_size)
    wall = time.perf_counter() - start
    stats = summarize(results)
    times = np.array([r.time_s for r in results])

    print(f"\nabscert-sound on {len(results)} MNIST test samples, {args.model}, config {args.config}: eps = {eps:g}, "
          f"d = {trained.abstraction.d:.4g} (timeout {args.timeout:g} s, {args.bound_method}); wall {wall:.1f} s")
    print(f"  verified {stats['verified']}  falsified {stats['falsified']}  unknown {stats['unknown']} "
          f"(unknown at the cap: {100 * stats['unknown_fraction']:.1f}%)")
    print(f"  paper-verified (abscert-paper): {sum(r.status == 'verified' for r in paper)}")
    both = sum(p.status == "verified" and s.status == "falsified" for p, s in zip(paper, results))
    print(f"  paper-verified but soundly falsified: {both}")
    stages = Counter((r.status, r.details.get("stage", "")) for r in results)
    print("  decided by: " + ", ".join(f"{stage}/{status} {n}" for (status, stage), n in sorted(stages.items())))
    print("  median ms/sample      all   (samples that ran the stage)")
    print(f"    total            {median_ms(times)}")
    for key, label in (("attack_s", "attack"), ("bounds_s", "bounds"), ("bab_s", "bab")):
        ran = [r.details[key] for r in results if r.details[key] > 0]
        print(f"    {label:<16} {median_ms(r.details[key] for r in results)}   {median_ms(ran)} (n = {len(ran)})")
    print(f"  mean ms/sample {1000 * stats['time_mean_s']:.1f}, p95 {1000 * stats['time_p95_s']:.1f}, "
          f"max {1000 * times.max():.1f}")
    open_pairs = [(r.details.get("min_margin_lb"), r.details.get("attack_margin")) for r in results
                  if r.status == "unknown"]
    if open_pairs:
        print(f"  unknown samples' worst margin in (medians: sound lower bound, attack's lowest margin): "
              f"{bracket(open_pairs)}")
    choice = [r.details["choice_pixels"] for r in results]
    print(f"  choice pixels per sample: median {np.median(choice):.0f}, max {max(choice)}")
    peak = peak_rss_mb()
    print(f"  peak resident memory: {peak:.0f} MiB")
    if args.counterexamples:
        written = save_counterexamples(args.counterexamples, results, x, eps)
        if args.checkpoint and Path(args.checkpoint).exists():
            rechecked = recheck_file(args.checkpoint, args.counterexamples)
            print(f"  counterexamples: {written} written, {sum(r['ok'] for r in rechecked)} re-checked ok")
        else:
            print(f"  counterexamples: {written} written to {args.counterexamples}")
    if args.json:
        record = {
            "label": args.label, "model": args.model, "config": args.config, "eps": eps, "d": trained.abstraction.d,
            "samples": len(results), "timeout_s": args.timeout, "bound_method": args.bound_method,
            "verifier_options": json.loads(args.verifier_options),
            "verified": stats["verified"], "falsified": stats["falsified"], "unknown": stats["unknown"],
            "unknown_pct": 100 * stats["unknown_fraction"],
            "paper_verified": sum(r.status == "verified" for r in paper),
            "paper_verified_sound_falsified": both, "unknown_margin_bracket": bracket(open_pairs),
            "median_ms": 1000 * float(np.median(times)),
            "p95_ms": 1000 * float(np.percentile(times, 95)), "mean_ms": 1000 * float(times.mean()),
            "max_ms": 1000 * float(times.max()), "wall_s": wall, "peak_rss_mb": peak,
            "choice_pixels_median": float(np.median(choice)), "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.device}",
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
        path = Path(args.json)
        records = json.loads(path.read_text()) if path.exists() else []
        records.append(record)
        path.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
