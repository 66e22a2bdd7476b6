"""Benchmark `abscert-sound` on MNIST: DM_Small AbsCert (point, d = 0.2), eps = 0.1.

    python benchmarks/sound_benchmark.py [--checkpoint PATH] [--samples 200] [--timeout 10]

Trains the model (5 epochs, batch 128) unless --checkpoint names an existing one (a fresh training run is
saved there when the path is given but does not exist yet), then verifies the first --samples test images
with the paper check and with abscert-sound and prints per-stage times, decision counts and the unknown
fraction. Counterexamples are written to --counterexamples (if given) and re-checked from that file.
Targets: median <= 50 ms per sample and < 1% unknown on CPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from abscert_bench.data import load_dataset  # noqa: E402
from abscert_bench.sound.recheck import recheck_file, save_counterexamples  # noqa: E402
from abscert_bench.trained import load_checkpoint, save_checkpoint  # noqa: E402
from abscert_bench.training import create_method  # noqa: E402
from abscert_bench.training.loop import TrainConfig, evaluate, train_model  # noqa: E402
from abscert_bench.verify import create_verifier, summarize  # noqa: E402

EPS, D = 0.1, 0.2


def get_model(args, dataset):
    """Load --checkpoint if it exists, else train DM_Small AbsCert (and save it to --checkpoint if given)."""
    if args.checkpoint and Path(args.checkpoint).exists():
        print(f"model: loaded {args.checkpoint}")
        return load_checkpoint(args.checkpoint)
    config = TrainConfig("mnist", "dm_small", "abscert", EPS, epochs=args.epochs, batch_size=128,
                         method_options={"d": D})
    method = create_method("abscert", EPS, d=D, variant="point")
    start = time.perf_counter()
    trained, metrics = train_model(config, method, dataset.train_x, dataset.train_y, dataset.test_x,
                                   dataset.test_y, dataset.num_classes,
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="model checkpoint to load, or where to save a fresh one")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=10.0, help="per-sample time limit (s)")
    parser.add_argument("--bound-method", default="crown", choices=["crown", "alpha-crown"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--counterexamples", help="write counterexamples to this .npz and re-check them")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = load_dataset("mnist")
    trained = get_model(args, dataset)
    x, y = dataset.test_x[:args.samples], dataset.test_y[:args.samples]
    print(f"clean accuracy (first {len(x)} test images): {evaluate(trained.classifier(), x, y):.4f}")
    print(f"torch threads: {torch.get_num_threads()}")

    paper = create_verifier("abscert-paper").verify(trained, x, y, EPS)
    verifier = create_verifier("abscert-sound", timeout=args.timeout, bound_method=args.bound_method)
    start = time.perf_counter()
    results = verifier.verify(trained, x, y, EPS, batch_size=args.batch_size)
    wall = time.perf_counter() - start
    stats = summarize(results)

    print(f"\nabscert-sound on {len(results)} MNIST test samples, eps = {EPS}, d = {D} "
          f"(timeout {args.timeout:g} s, {args.bound_method}); wall {wall:.1f} s")
    print(f"  verified {stats['verified']}  falsified {stats['falsified']}  unknown {stats['unknown']} "
          f"(unknown at the cap: {100 * stats['unknown_fraction']:.1f}%)")
    print(f"  paper-verified (abscert-paper): {sum(r.status == 'verified' for r in paper)}")
    both = sum(p.status == "verified" and s.status == "falsified" for p, s in zip(paper, results))
    print(f"  paper-verified but soundly falsified: {both}")
    stages = Counter((r.status, r.details.get("stage", "")) for r in results)
    print("  decided by: " + ", ".join(f"{stage}/{status} {n}" for (status, stage), n in sorted(stages.items())))
    print("  median ms/sample      all   (samples that ran the stage)")
    print(f"    total            {median_ms(r.time_s for r in results)}")
    for key, label in (("attack_s", "attack"), ("bounds_s", "bounds"), ("bab_s", "bab")):
        ran = [r.details[key] for r in results if r.details[key] > 0]
        print(f"    {label:<16} {median_ms(r.details[key] for r in results)}   {median_ms(ran)} (n = {len(ran)})")
    print(f"  mean ms/sample {1000 * stats['time_mean_s']:.1f}, p95 {1000 * stats['time_p95_s']:.1f}, "
          f"max {1000 * max(r.time_s for r in results):.1f}")
    for r in results:
        if r.details.get("stage") in ("bab", "timeout"):
            print(f"    sample {r.index}: {r.status} by {r.details['stage']}, root margin bound "
                  f"{r.details.get('min_margin_lb', float('nan')):.3f}, {r.details['branches']} branches, "
                  f"{r.time_s:.1f} s")
    choice = [r.details["choice_pixels"] for r in results]
    print(f"  choice pixels per sample: median {np.median(choice):.0f}, max {max(choice)}")
    if args.counterexamples:
        written = save_counterexamples(args.counterexamples, results, x, EPS)
        if args.checkpoint and Path(args.checkpoint).exists():
            report = recheck_file(args.checkpoint, args.counterexamples)
            print(f"  counterexamples: {written} written, {sum(r['ok'] for r in report)} re-checked ok")
        else:
            print(f"  counterexamples: {written} written to {args.counterexamples}")


if __name__ == "__main__":
    main()
