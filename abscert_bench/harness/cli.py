"""argparse wiring for `abscert-bench run SPEC` and `abscert-bench run-table DIR` (see docs/harness.md)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import validate as V
from ..errors import UserError


def add_run_parser(subparsers: Any) -> None:
    """Add the `run` and `run-table` verbs to the CLI's subparsers."""
    p = subparsers.add_parser("run", help="run a whole suite spec (train → verify → export per cell), resumable",
                              description="Expand SPEC's grid into cells, skip the cells already complete in the "
                                          "results store, run the rest (in-process, or on Dask), write the tables "
                                          "and plots. Safe to kill at any moment: rerun to finish.")
    p.add_argument("spec", help="suite spec (TOML), e.g. specs/quick.toml")
    p.add_argument("--out", default=None, help="results store (default: runs/<spec name>)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=V.positive_int, default=None,
                       help="start a local Dask cluster of N single-threaded worker processes")
    where.add_argument("--scheduler", type=V.scheduler_address, default=None,
                       help="address of an existing Dask scheduler (tcp://host:8786)")
    p.add_argument("--threads", type=V.positive_int, default=None,
                   help="torch threads per cell (default: 1 on Dask workers, torch's default in-process)")
    p.add_argument("--data-root", type=V.directory_arg, default=None,
                   help="data directory (default: the spec's data.root, $ABSCERT_DATA or ./data)")
    p.add_argument("--force", action="store_true", help="discard an existing results store and start again")
    p.add_argument("--no-report", action="store_true", help="do not write tables/ and plots/ at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser("run-table", help="paper-style tables (Markdown, LaTeX) and plots from a results store",
                              description="Print the comparison table of a `run` results store (or of run "
                                          "directories) and optionally write LaTeX, CSV and plots.")
    p.add_argument("path", help="results store written by `run` (or a folder of run directories)")
    p.add_argument("--latex", default=None, help="write the LaTeX (booktabs) tables to this file")
    p.add_argument("--markdown", default=None, help="also write the Markdown to this file")
    p.add_argument("--plots", default=None, help="write the figures (PNG + PDF) into this folder")
    p.add_argument("--scalability", action="store_true", help="print the scalability table instead")
    p.set_defaults(func=cmd_run_table)

    p = subparsers.add_parser("slim", help="take large checkpoints out of a results store (to commit it to git)",
                              description="Replace each committed checkpoint larger than --max-mb MiB by a small "
                                          "stub (size, SHA-256). The cells stay complete: tables, plots and "
                                          "resuming work as before; re-checking or exporting those models "
                                          "needs them retrained.")
    p.add_argument("store", help="results store written by `run`")
    p.add_argument("--max-mb", type=V.nonneg_float, required=True, help="keep checkpoints up to this size (MiB)")
    p.set_defaults(func=cmd_slim)


def cmd_run(args: argparse.Namespace) -> int:
    """`run`: execute a suite and print its summary."""
    import sys

    from .spec import load_spec
    from .suite import run_suite

    spec = load_spec(args.spec)
    out = Path(args.out) if args.out else Path("runs") / spec.name
    V.check_dir_target(out, "results store")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    report = run_suite(spec, out, workers=args.workers, scheduler=args.scheduler, force=args.force,
                       data_root=args.data_root, progress=not args.quiet and sys.stderr.isatty(),
                       torch_threads=args.threads)
    print(report.summary())
    if not args.no_report:
        written = write_report(report.store)
        if written:
            print(f"tables and plots: {', '.join(str(p.relative_to(report.store)) for p in written)}")
    return 1 if report.count("failed") else 0


def write_report(store: Path) -> list[Path]:
    """tables/ (comparison.md, comparison.tex, scalability.md) and plots/ of a store with complete cells."""
    from .plots import make_plots
    from .tables import load_rows, scalability_markdown, scalability_rows, to_latex, to_markdown

    written: list[Path] = []
    tables = store / "tables"
    tables.mkdir(exist_ok=True)
    scal = scalability_rows(store)
    if scal:
        (tables / "scalability.md").write_text(scalability_markdown(scal))
        written.append(tables / "scalability.md")
    try:
        rows = load_rows(store)
    except UserError:
        return written
    (tables / "comparison.md").write_text(to_markdown(rows))
    (tables / "comparison.tex").write_text(to_latex(rows))
    written += [tables / "comparison.md", tables / "comparison.tex"]
    written += make_plots(store, store / "plots")
    return written


def cmd_run_table(args: argparse.Namespace) -> int:
    """`run-table`: print tables, optionally write LaTeX / Markdown / plots."""
    from ..owned import PLOTS, check_output_file, prepare_plots, record_written, write_output_file
    from .plots import make_plots
    from .tables import load_rows, scalability_markdown, scalability_rows, to_latex, to_markdown

    path = Path(args.path)
    V.check_input_dir(path, "results store or folder")
    for option, target in (("--latex", args.latex), ("--markdown", args.markdown)):
        if target:
            V.check_file_target(Path(target), option)
    for option, kind in (("markdown", "markdown"), ("latex", "latex")):  # refused before any work
        if getattr(args, option, None):
            check_output_file(Path(getattr(args, option)), kind, f"--{option}")
    if args.plots:
        prepare_plots(Path(args.plots))
    if args.scalability:
        if not (path / "suite.json").exists():
            raise UserError(f"{path} is not a results store written by `run` (no suite.json)")
        text = scalability_markdown(scalability_rows(path))
        print(text, end="")
        if args.markdown:
            write_output_file(Path(args.markdown), text, "markdown", "--markdown")
        return 0
    rows = load_rows(path)
    text = to_markdown(rows)
    print(text, end="")
    if args.markdown:
        write_output_file(Path(args.markdown), text, "markdown", "--markdown")
    if args.latex:
        write_output_file(Path(args.latex), to_latex(rows), "latex", "--latex")
    if args.plots:
        plots = Path(args.plots)
        written = make_plots(path, plots)
        for figure in written:
            print(f"wrote {figure}")
        if plots.is_dir():
            record_written(plots, PLOTS, [p.name for p in plots.iterdir() if p not in written])
    return 0


def cmd_slim(args: argparse.Namespace) -> int:
    """`slim`: replace large checkpoints by stubs."""
    from .store import slim_store

    if not args.max_mb >= 0:
        raise UserError(f"--max-mb must be >= 0, got {args.max_mb}")
    if not Path(args.store).is_dir():
        raise UserError(f"no such results store {args.store}")
    removed = slim_store(args.store, args.max_mb)
    total = sum(mb for _, mb in removed)
    print(f"took {len(removed)} checkpoint(s) out ({total:.1f} MiB); kept those up to {args.max_mb:g} MiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (`python -m abscert_bench.harness run …`): the main CLI, same errors."""
    from ..cli import main as cli_main

    return cli_main(argv)
