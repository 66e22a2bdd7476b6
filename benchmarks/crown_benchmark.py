"""Benchmark a bound verifier (crown, alpha-crown, ibp) on a naturally trained MNIST model, within a memory budget.

    python benchmarks/crown_benchmark.py --model dm_large [--verifier crown] [--samples 100] [--eps 0.1]
        [--memory-mb 4096] [--time-limit S] [--checkpoint PATH] [--json OUT.json] [--label NAME]

Trains the natural model (--epochs, batch 128) unless --checkpoint names an existing one, verifies the first
--samples MNIST test images and prints the decision counts, the per-sample time, how many samples needed the
cheaper IBP-intermediate cascade, and the process's peak resident memory. Target (issue 10): CROWN on natural
DM_Large completes 100 images within 8 GB.
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
from abscert_bench.trained import load_checkpoint, save_checkpoint  # noqa: E402
from abscert_bench.training import create_method  # noqa: E402
from abscert_bench.training.loop import TrainConfig, train_model  # noqa: E402
from abscert_bench.verification import create_verifier, summarize  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dm_large")
    parser.add_argument("--verifier", default="crown", choices=["crown", "alpha-crown", "ibp"])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--memory-mb", type=float, default=4096.0, help="memory budget of one bound call (MiB)")
    parser.add_argument("--time-limit", type=float, default=None, help="s per sample (default: none)")
    parser.add_argument("--checkpoint", help="model checkpoint to load, or where to save a fresh one")
    parser.add_argument("--json", help="append this run's figures to a JSON list in this file")
    parser.add_argument("--label", default="", help="a name for this run in the --json record (e.g. before/after)")
    args = parser.parse_args(argv)
    dataset = load_dataset("mnist")
    if args.checkpoint and Path(args.checkpoint).exists():
        trained = load_checkpoint(args.checkpoint)
    else:
        config = TrainConfig("mnist", args.model, "natural", args.eps, epochs=args.epochs, batch_size=128)
        trained, _ = train_model(config, create_method("natural", args.eps), dataset.train_x, dataset.train_y,
                                 dataset.test_x, dataset.test_y, dataset.num_classes,
                                 on_epoch=lambda row: print(f"  epoch {row['epoch']}: test acc {row['test_acc']:.4f}",
                                                            flush=True))
        if args.checkpoint:
            save_checkpoint(trained, Path(args.checkpoint))
    x, y = dataset.test_x[:args.samples], dataset.test_y[:args.samples]
    verifier = create_verifier(args.verifier, memory_mb=args.memory_mb, time_limit=args.time_limit)
    start = time.perf_counter()
    results = verifier.verify(trained, x, y, args.eps)
    wall = time.perf_counter() - start
    stats = summarize(results)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    cascade = sum(r.details.get("bound") == "ibp-intermediate" for r in results)
    stages = Counter(r.details.get("stage", "") for r in results if r.status == "unknown")
    print(f"{args.verifier} on natural {args.model}, {len(results)} MNIST test images, eps {args.eps:g}: "
          f"verified {stats['verified']}, falsified {stats['falsified']}, unknown {stats['unknown']} "
          f"({dict(stages)}); IBP-intermediate cascade on {cascade}; wall {wall:.0f} s "
          f"({1000 * wall / max(1, len(results)):.0f} ms/sample); peak resident memory {peak:.0f} MiB "
          f"(budget {args.memory_mb:.0f} MiB per bound call)")
    if args.json:
        record = {"label": args.label, "model": args.model, "verifier": args.verifier, "eps": args.eps,
                  "samples": len(results),
                  "verified": stats["verified"], "falsified": stats["falsified"], "unknown": stats["unknown"],
                  "cascade": cascade, "wall_s": wall, "ms_per_sample": 1000 * wall / max(1, len(results)),
                  "median_ms": 1000 * float(np.median([r.time_s for r in results])), "peak_rss_mb": peak,
                  "memory_mb": args.memory_mb, "time_limit_s": args.time_limit,
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
                  "date": time.strftime("%Y-%m-%d %H:%M")}
        path = Path(args.json)
        records = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(records + [record], indent=1) + "\n")


if __name__ == "__main__":
    main()
