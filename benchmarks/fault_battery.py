"""Run every bad-input case of tests/bad_inputs_cases.py through `abscert_bench.cli.main` and count the outcomes.

    PYTHONPATH=$PWD:$PWD/baselines python benchmarks/fault_battery.py [-v] [--only SUBSTRING]

Prints `tried N / clean C / tracebacks T / silently accepted A / other O / files lost L` (other: a non-zero exit
that is not one clean error line, e.g. a usage block) and, with -v, one line per case that is not clean. The
legitimately accepted inputs (ACCEPTED) are run too and reported as `accepted cases: ok K / failing F`.
Each case runs in-process in a fresh temporary folder with private copies of the fixtures.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bad_inputs_cases import (  # noqa: E402
    ACCEPTED,
    CASES,
    build_fixtures,
    classify,
    lost_files,
    materialise,
    snapshot,
)


def call(argv: list[str]) -> tuple[int | None, str, str, BaseException | None]:
    """main(argv) with stdout/stderr captured; (exit code, out, err, exception that escaped)."""
    from abscert_bench.cli import main

    out, err = io.StringIO(), io.StringIO()
    code: int | None = None
    raised: BaseException | None = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:  # noqa: BLE001 - a traceback is what the battery counts
            raised = exc
            traceback.print_exc(file=err)
    return code, out.getvalue(), err.getvalue(), raised


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per case that is not clean")
    parser.add_argument("-a", "--all", action="store_true", help="with -v: also print the clean error lines")
    parser.add_argument("--only", default=None, help="run only the cases whose id contains this")
    args = parser.parse_args()
    from abscert_bench.cli import main as cli_main

    counts = {"clean": 0, "traceback": 0, "accepted": 0, "other": 0}
    lost = 0
    with tempfile.TemporaryDirectory(prefix="fault-battery-") as root:
        root_path = Path(root)
        cwd = os.getcwd()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            fixtures = build_fixtures(root_path / "fixtures", cli_main)
        cases = [c for c in CASES if args.only is None or args.only in c.id]
        for i, case in enumerate(cases):
            tmp = root_path / f"case{i:03d}"
            argv = materialise(case, fixtures, tmp)
            before = snapshot(tmp)
            os.chdir(tmp)
            try:
                code, _, err, raised = call(argv)
            finally:
                os.chdir(cwd)
            kind = classify(code, err, raised)
            counts[kind] += 1
            gone = lost_files(before, snapshot(tmp))
            lost += bool(gone)
            if args.verbose and (kind != "clean" or gone or args.all):
                last = (err.strip().splitlines() or [""])[-1][:160]
                print(f"{kind:>9} {case.id}: exit {code}; {last}" + (f"; LOST {gone}" if gone else ""))
        ok = failing = 0
        for i, acc in enumerate(a for a in ACCEPTED if args.only is None or args.only in a.id):
            tmp = root_path / f"accepted{i:03d}"
            argv = materialise(acc, fixtures, tmp)
            code, out, err, raised = call(argv)
            try:
                assert raised is None, repr(raised)
                acc.check(tmp, code or 0, out, err)
                ok += 1
            except AssertionError as exc:
                failing += 1
                if args.verbose:
                    print(f"accepted-case FAILING {acc.id}: exit {code}; {str(exc)[:160]}")
    print(f"tried {len(cases)} / clean {counts['clean']} / tracebacks {counts['traceback']} / silently accepted "
          f"{counts['accepted']} / other {counts['other']} / files lost {lost}")
    print(f"accepted cases: ok {ok} / failing {failing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
