"""How tight is each way of giving auto_LiRPA the deployed AbsCert classifier's reachable inputs?

The question behind it (issue 11): could the abstraction phi be registered as an auto_LiRPA custom operator
instead of the gap form the sound verifier bounds? phi is a staircase, so the best an operator can give auto_LiRPA
is a sound relaxation of each output channel on its own; with exact interval bounds per channel that is the
*box form*: N over the box [lower ends] × [upper ends] of the reachable cells, where `upper = lower + d` is lost
(a linear relaxation of the staircase relates both ends to x, but only up to a slack of about one cell d each, so
it cannot recover the tie either). The *gap form* keeps the tie exactly ([lower, gap] with gap boxes ~1e-8 wide).

For the first N test images this trains (or loads) an AbsCert model through the Python API and counts the images
whose margins CROWN (and IBP) bound positive over each form, with the mean worst margin bound.

    python benchmarks/hull_forms.py --dataset mnist --model dm_small --eps 0.1 --d 0.2 --samples 200 \
        --json results/hull-forms/records.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

import abscert_bench as ab
from abscert_bench.data import load_dataset
from abscert_bench.lirpa import bounded_input, bounded_module, margin_matrix
from abscert_bench.models import create_model
from abscert_bench.sound.bounds import HullBounder


def box_form_inputs(choices, shape):
    """Per image the box [lower ends] × [upper ends] over all reachable options (monotone: first and last)."""
    n = choices.count.shape[0]
    last = choices.count - 1
    rows = np.arange(choices.count.shape[1])[None, :]
    samples = np.arange(n)[:, None]
    lo = np.concatenate([choices.lower[:, :, 0], choices.upper[:, :, 0]], axis=1)
    hi = np.concatenate([choices.lower[samples, rows, last], choices.upper[samples, rows, last]], axis=1)
    c, h, w = shape
    return (torch.from_numpy(lo.astype(np.float32)).view(n, 2 * c, h, w),
            torch.from_numpy(hi.astype(np.float32)).view(n, 2 * c, h, w))


def margins(bounded, lower, upper, labels, num_classes, method):
    spec = margin_matrix(labels, num_classes)
    with torch.no_grad():
        lb, _ = bounded.compute_bounds(x=(bounded_input(lower, upper),), C=spec, method=method, bound_upper=False)
    return lb.min(dim=1).values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default="dm_small")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--d", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-limit", type=int, default=20000, help="first N training images")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="append the record to this JSON list")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    data = load_dataset(args.dataset)
    c, h, w = data.input_shape
    loader = DataLoader(TensorDataset(data.train_x[:args.train_limit], data.train_y[:args.train_limit]),
                        batch_size=128, shuffle=True)
    net = create_model(args.model, (2 * c, h, w), data.num_classes)
    start = time.perf_counter()
    trained = ab.train(net, loader, "abscert", eps=args.eps, d=args.d, epochs=args.epochs, seed=args.seed)
    train_s = time.perf_counter() - start
    x, y = data.test_x[:args.samples], data.test_y[:args.samples]
    clean = ab.accuracy(trained, [(x, y)])

    choices = ab.reachable_choices(trained.abstraction, x, args.eps)
    gap = HullBounder(trained)  # the exact gap form (folded into N's first layer where possible)
    gap_lo, gap_hi = gap.root_box(choices)
    box_lo, box_hi = box_form_inputs(choices, (c, h, w))
    box_module = bounded_module(trained.network.eval(), box_lo)
    record = {"dataset": args.dataset, "model": args.model, "eps": args.eps, "d": args.d, "epochs": args.epochs,
              "train_images": min(args.train_limit, len(data.train_x)), "samples": len(x), "seed": args.seed,
              "clean_accuracy": clean, "train_s": round(train_s, 1), "forms": {}}
    for method in ("IBP", "CROWN"):
        for form, (bounded, lo, hi) in {"gap": (gap.bounded, gap_lo, gap_hi),
                                        "box": (box_module, box_lo, box_hi)}.items():
            worst = torch.cat([margins(bounded, lo[i:i + 50], hi[i:i + 50], y[i:i + 50], data.num_classes, method)
                               for i in range(0, len(x), 50)])
            record["forms"][f"{form}/{method}"] = {"verified": int((worst > 0).sum()),
                                                    "mean_worst_margin_bound": float(worst.mean())}
    print(json.dumps(record, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        records = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.write_text(json.dumps(records + [record], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
