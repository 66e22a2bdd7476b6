"""Run a benchmark script of this checkout over the package code of another checkout (for "before" rows).

    python benchmarks/at_commit.py WORKTREE benchmarks/SCRIPT.py [script arguments]

WORKTREE is a checkout of an older commit (`git worktree add /tmp/before COMMIT`). Its `abscert_bench` (and
`abscert_bench_baselines`, where it has one) come first on the path, so the script measures that code; in
commits before the `verify/` → `verification/` rename the script's `abscert_bench.verification` imports are
served by the old `abscert_bench.verify`. Prints which files were measured.
"""
from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: at_commit.py WORKTREE SCRIPT [ARGS...]")
    tree, script = Path(sys.argv[1]).resolve(), str(Path(sys.argv[2]).resolve())
    sys.path[:0] = [str(tree), str(tree / "baselines")]
    package = importlib.import_module("abscert_bench")
    if not str(package.__file__).startswith(str(tree)):
        sys.exit(f"at_commit.py: abscert_bench resolved to {package.__file__}, not under {tree}")
    if not (tree / "abscert_bench" / "verification").is_dir():
        sys.modules["abscert_bench.verification"] = importlib.import_module("abscert_bench.verify")
    sys.argv = [script] + sys.argv[3:]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        print(f"code measured: {Path(str(package.__file__)).parent}")


if __name__ == "__main__":
    main()
