"""Harness benchmark: overhead per cell (excluding training and verification) and Dask 2 workers vs 1.

    python benchmarks/harness_benchmark.py                       # specs/quick.toml as shipped (minutes)
    python benchmarks/harness_benchmark.py --tiny                # same grid, 1 epoch / 300 images / 5 samples

One invocation runs the spec three times into fresh temporary stores: in-process (overhead), then on a
LocalCluster of 1 worker and of 2 workers (speed-up), so the two timings share the machine's state.
Targets: overhead < 1 s per cell; speed-up >= 1.7x (needs >= 2 free cores).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from abscert_bench.harness import Store, parse_spec, run_suite  # noqa: E402
from abscert_bench.harness.spec import tomllib  # noqa: E402


def tiny_spec(path: Path, tiny: bool):
    """The spec, with a tiny training/verification budget when asked (grid unchanged)."""
    text = path.read_text()
    data = tomllib.loads(text)
    if tiny:
        data = copy.deepcopy(data)
        data.setdefault("train", {}).update({"epochs": 1, "limit": 300, "warmup_epochs": 0, "ramp_epochs": 1})
        data.setdefault("verify", {}).update({"limit": 5, "timeout": 1.0})
    return parse_spec(data, str(path), text)


def stage_seconds(store: Path) -> list[float]:
    """Per committed cell: seconds spent in training, verification and export stages."""
    return [sum(s.get("seconds", 0.0) for s in r["stages"].values()) for _, r in Store(store).results()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(ROOT / "specs" / "quick.toml"))
    parser.add_argument("--tiny", action="store_true", help="1 epoch, 300 training images, 5 verified samples")
    args = parser.parse_args()
    spec = tiny_spec(Path(args.spec), args.tiny)
    import os
    import platform
    from datetime import datetime, timezone

    import torch

    print(f"# harness benchmark — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPU cores, "
          f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}")
    spec_path = Path(args.spec).resolve()
    shown = spec_path.relative_to(ROOT) if spec_path.is_relative_to(ROOT) else spec_path
    print(f"command: python benchmarks/harness_benchmark.py{' --tiny' if args.tiny else ''} --spec {shown}")
    print(f"spec {spec.name} ({len(spec.cells)} cells){' [tiny budget]' if args.tiny else ''}")
    with tempfile.TemporaryDirectory(prefix="harness-bench-") as tmp:
        tmp_path = Path(tmp)
        serial = run_suite(spec, tmp_path / "serial", progress=False)
        work = stage_seconds(tmp_path / "serial")
        per_cell = [r["harness_overhead_s"] for r in serial.ran.values()]
        overhead = (serial.seconds - sum(work)) / len(spec.cells)
        print(f"in-process: {serial.seconds:.1f} s for {len(spec.cells)} cells, "
              f"of which train+verify {sum(work):.1f} s")
        print(f"harness overhead per cell (suite wall − train − verify, ÷ cells): {overhead:.3f} s "
              f"[target < 1 s]; inside the cell: median {statistics.median(per_cell):.3f} s, "
              f"max {max(per_cell):.3f} s (the first cell pays the imports)")
        timings = {}
        for workers in (1, 2):
            report = run_suite(spec, tmp_path / f"dask{workers}", workers=workers, progress=False)
            failed = report.count("failed")
            timings[workers] = report
            print(f"dask {workers} worker(s): wall {report.seconds:.1f} s (cells {report.cells_seconds:.1f} s, "
                  f"cluster start/stop {report.seconds - report.cells_seconds:.1f} s)"
                  + (f", {failed} failed" if failed else ""))
        wall = timings[1].seconds / timings[2].seconds
        cells = timings[1].cells_seconds / timings[2].cells_seconds
        print(f"speed-up 2 workers vs 1: {wall:.2f}x wall, {cells:.2f}x on the cells [target >= 1.7x]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
