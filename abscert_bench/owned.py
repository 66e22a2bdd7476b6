"""What the tool owns: every folder it creates carries a marker, and `--force` replaces only the tool's entries.

The rule, for every verb that writes a folder (train's run directory, export's VNN-COMP folder, the results store
of run / compare / demo, vnncomp run's results folder):

* a target that does not exist, or holds no files at all, is written;
* an existing target with files needs `--force`, and even then it must be a folder of the right kind written by
  abscert-bench: its marker file `.abscert-bench.json` names the kind (or, for folders made before markers, the
  kind's own metadata file: `config.json` + `checkpoint.pt` of a run directory, `suite.json` of a store,
  `benchmark.json` of an export, each checked for the fields the tool writes); anything else is refused with one
  line saying why, and nothing is deleted;
* with `--force` on a folder of the right kind, only the entries the tool writes there (the kind's names and
  those the marker lists) are removed or replaced; any other file in it is kept, and reported in one line.

The marker is JSON: {"format", "kind", "tool", "version", "created", "entries"} (entries: the top-level names the
tool wrote, updated when it writes more).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

MARKER = ".abscert-bench.json"
MARKER_FORMAT = "abscert-bench-folder/1"


@dataclass(frozen=True)
class Kind:
    """A kind of folder the tool writes: its key in the marker, a description, the names it holds, and how a
    folder of that kind written before markers existed is recognised."""

    key: str
    what: str
    entries: frozenset[str]
    legacy: Callable[[Path], bool]


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _legacy_run(folder: Path) -> bool:
    config = _json_object(folder / "config.json")
    return (config is not None and all(k in config for k in ("dataset", "model", "method", "eps"))
            and ((folder / "checkpoint.pt").is_file() or (folder / "checkpoint.pt.omitted.json").is_file()))


def _legacy_format(name: str, prefix: str) -> Callable[[Path], bool]:
    def recognise(folder: Path) -> bool:
        meta = _json_object(folder / name)
        return meta is not None and str(meta.get("format", "")).startswith(prefix)
    return recognise


def _legacy_results(folder: Path) -> bool:
    """A vnncomp run results folder of an earlier version: only VNN-COMP result files."""
    files = [p for p in folder.iterdir()]
    if not files or not all(p.is_file() and p.name.endswith(".txt") for p in files):
        return False
    for path in files:
        try:
            first = path.read_text().split(None, 1)
        except (OSError, UnicodeDecodeError):
            return False
        if not first or first[0] not in ("sat", "unsat", "unknown", "timeout", "error"):
            return False
    return True


RUN = Kind("run", "run directory", frozenset({
    "config.json", "checkpoint.pt", "checkpoint.pt.omitted.json", "metrics.csv", "granularity_search.csv",
    "granularity_search_epochs.csv", "verify"}), _legacy_run)
EXPORT = Kind("vnncomp-benchmark", "VNN-COMP benchmark folder", frozenset({
    "README.md", "instances.csv", "onnx", "vnnlib", "vnnlib2", "benchmark.json", "images.npz", "results.csv",
    "results", "generate_properties.py", "abcrown.yaml", "instances-abcrown.csv"}),
    _legacy_format("benchmark.json", "abscert-bench-vnncomp/"))
RESULTS = Kind("vnncomp-results", "vnncomp run results folder", frozenset(), _legacy_results)


def _legacy_plots(folder: Path) -> bool:
    """A plots folder of an earlier version: only figures."""
    files = list(folder.iterdir())
    return bool(files) and all(p.is_file() and p.suffix in (".png", ".pdf") for p in files)


PLOTS = Kind("plots", "plots folder", frozenset(), _legacy_plots)


def store_kind(entries: Iterable[str]) -> Kind:
    """The results store's kind (its names are the store's, declared in harness/store.py)."""
    return Kind("store", "results store", frozenset(entries), _legacy_format("suite.json", "abscert-bench-suite/"))


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's marker, or None when it has none (or an unreadable one)."""
    marker = _json_object(Path(folder) / MARKER)
    return marker if marker is not None and marker.get("format") == MARKER_FORMAT else None


def write_marker(folder: Path, kind: Kind, entries: Iterable[str] = ()) -> None:
    """Write (or update) the marker of a folder the tool made; `entries` are the names it wrote there."""
    from . import __version__

    folder = Path(folder)
    old = read_marker(folder) or {}
    names = sorted((set(old.get("entries", [])) | set(entries)) - {MARKER})
    data = {"format": MARKER_FORMAT, "kind": kind.key, "tool": "abscert-bench", "version": __version__,
            "created": old.get("created", time.strftime("%Y-%m-%dT%H:%M:%S%z")), "entries": names}
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / MARKER)


def is_kind(folder: Path, kind: Kind) -> bool:
    """Whether `folder` is a folder of `kind` written by abscert-bench (its marker, or an older folder's own files)."""
    marker = read_marker(folder)
    if marker is not None:
        return marker.get("kind") == kind.key
    return kind.legacy(Path(folder))


def owned_names(folder: Path, kind: Kind) -> set[str]:
    """The names in `folder` that the tool wrote: the kind's, those its marker lists, the marker, and their .tmp."""
    marker = read_marker(folder)
    if marker is None and not kind.entries and Path(folder).is_dir() and kind.legacy(Path(folder)):
        return {p.name for p in Path(folder).iterdir()}  # an older folder of a kind that holds only its own files
    names = set(kind.entries) | {str(n) for n in (marker or {}).get("entries", [])} | {MARKER}
    return names | {n + ".tmp" for n in names}


def has_files(folder: Path) -> bool:
    """Whether a folder holds any file (empty subfolders do not count)."""
    return any(not p.is_dir() or p.is_symlink() for p in Path(folder).rglob("*"))


def split_entries(folder: Path, kind: Kind) -> tuple[list[Path], list[str]]:
    """(the tool's entries in `folder`, the names of everything else there)."""
    owned = owned_names(folder, kind)
    children = sorted(Path(folder).iterdir())
    return [p for p in children if p.name in owned], [p.name for p in children if p.name not in owned]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def report_kept(folder: Path, kept: list[str]) -> None:
    """One line on stderr naming the files in a replaced folder that were not the tool's (and were kept)."""
    if kept:
        shown = ", ".join(kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
        print(f"abscert-bench: kept {len(kept)} entr{'y' if len(kept) == 1 else 'ies'} in {folder} that "
              f"abscert-bench did not write: {shown}", file=sys.stderr)


def prepare_folder(folder: Path, kind: Kind, force: bool, option: str = "--out", remove: bool = True) -> list[str]:
    """Check that `folder` may be written as a `kind` folder (see the module's rule) and, with `force` on a folder
    of that kind, remove the tool's entries (unless `remove` is False: the caller replaces them itself).
    Returns the names of the other entries (kept). Raises UserError, touching nothing, when it may not."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        check_writable(folder)
        return []
    if not folder.is_dir():
        raise UserError(f"{option} {folder} exists and is not a folder; choose another {option}")
    if not has_files(folder):
        check_writable(folder / MARKER)
        return []
    if not is_kind(folder, kind):
        sample = next((p.name for p in sorted(folder.iterdir()) if p.name not in owned_names(folder, kind)),
                      next(iter(sorted(p.name for p in folder.iterdir())), ""))
        raise UserError(f"{folder} exists and is not a {kind.what} written by abscert-bench (no {MARKER} of kind "
                        f"{kind.key!r}; it holds {sample!r}), so even --force does not replace it; nothing was "
                        f"deleted: choose another {option} or remove it yourself")
    if not force:
        raise UserError(f"{kind.what} {folder} already exists; pass --force to replace it (only what abscert-bench "
                        "wrote there is replaced)")
    check_writable(folder / MARKER)
    owned, kept = split_entries(folder, kind)
    if remove:
        for path in owned:
            _remove(path)
    return kept


def discard(folder: Path, kind: Kind) -> None:
    """After a failed write: remove the tool's entries again, and the folder itself when nothing else is left."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    owned, _ = split_entries(folder, kind)
    for path in owned:
        _remove(path)
    if not any(folder.iterdir()):
        folder.rmdir()


def record_written(folder: Path, kind: Kind, kept: Iterable[str]) -> None:
    """Update the marker with every entry now in `folder` except the `kept` ones (which are not the tool's)."""
    write_marker(folder, kind, [p.name for p in Path(folder).iterdir() if p.name not in set(kept)])


def check_writable(path: Path) -> None:
    """Refuse early (OSError, which the CLI reports as `cannot write …`) when `path` could not be created: probe
    the nearest existing folder above it with a temporary file."""
    probe = Path(path).absolute()
    if probe.exists() and not probe.is_dir():
        probe = probe.parent
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot write {path}: {probe} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None


WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def os_error_line(exc: OSError) -> str | None:
    """The one-line message for an OSError that means a write (or read) was not allowed; None for other errors."""
    if exc.errno not in WRITE_ERRNOS:
        return None
    name = exc.filename or ""
    unreadable = bool(name) and os.path.isfile(name) and not os.access(name, os.R_OK)
    verb = "read" if unreadable else "write"
    return f"cannot {verb} {name}: {exc.strerror}" if name else f"cannot {verb}: {exc.strerror}"


# -- single output files (table --csv, run-table --latex / --markdown) ----------------------------------------
OUTPUT_HEADS = {
    "csv": ("a table CSV", ("dataset,model,",)),
    "markdown": ("a Markdown table", ("| dataset | model |",)),
    "latex": ("a LaTeX table", ("% generated by abscert-bench",)),
}


def check_output_file(path: Path, kind: str, option: str) -> None:
    """An output file may be written where none is, or over an empty one or one that abscert-bench wrote (known by
    its first line: OUTPUT_HEADS); anything else is refused, touching nothing."""
    path = Path(path)
    what, heads = OUTPUT_HEADS[kind]
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name")
    if path.exists() or path.is_symlink():
        try:
            with path.open(errors="replace") as handle:
                first = handle.readline().lstrip("\ufeff")
        except OSError:
            first = ""
        if first.strip() and not first.startswith(heads):
            raise UserError(f"{option} {path} exists and is not {what} abscert-bench wrote, so it is not replaced; "
                            "choose another file or remove it yourself (nothing was changed)")
    check_writable(path)


def write_output_file(path: Path, text: str, kind: str, option: str) -> None:
    """Write an output file atomically after `check_output_file` (no temporary file is left on failure)."""
    check_output_file(path, kind, option)
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    try:
        tmp.write_text(text, newline="")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def prepare_plots(folder: Path) -> None:
    """`run-table --plots DIR`: DIR must be new, empty, or a plots folder abscert-bench wrote (marker, or only
    figures); the figures are then written over their own names and a user's other files stay."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--plots {folder} exists and is not a folder")
    if folder.is_dir() and has_files(folder) and not is_kind(folder, PLOTS):
        raise UserError(f"--plots {folder} exists and is not a plots folder written by abscert-bench (no {MARKER}; "
                        "it holds files other than figures); choose another folder (nothing was changed)")
    check_writable(folder / MARKER)
