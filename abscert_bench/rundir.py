"""Run directories: created without clobbering anything, written atomically, read back by `table`."""
from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def create_run_dir(path: Path, force: bool = False) -> Path:
    """Create `path` with its marker; an existing one with files needs `force` and must be a run directory written
    by abscert-bench (then only the tool's files are removed, any other file is kept: see owned.py)."""
    from .owned import RUN, prepare_folder, report_kept, write_marker

    path = Path(path)
    report_kept(path, prepare_folder(path, RUN, force))
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        write_marker(path, RUN)
    except BaseException:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def finish_run_dir(path: Path) -> None:
    """List what training wrote in the run directory's marker."""
    from .owned import RUN, write_marker

    write_marker(path, RUN, [p.name for p in path.iterdir() if p.name in RUN.entries])


def discard_run_dir(path: Path) -> None:
    """Remove what the tool wrote into a run directory whose training failed (a user's files stay)."""
    from .owned import RUN, discard

    discard(path, RUN)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """Read JSON of any type, with a one-line error naming the file when it is missing, binary or malformed."""
    from .validate import read_json_file

    return read_json_file(path, kind=None)


def write_csv(path: Path, rows: Iterable[dict[str, Any]], fieldnames: list[str] | None = None) -> None:
    """Write rows as CSV atomically."""
    rows = list(rows)
    fieldnames = fieldnames or (list(rows[0]) if rows else [])
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_csv(path: Path) -> list[dict[str, str]]:
    """Read a CSV into a list of dicts (missing, binary or corrupt files: a one-line UserError)."""
    from .validate import read_csv_file

    return read_csv_file(path)
