"""The results store of a suite: one directory per finished cell, each committed by one atomic rename.

Layout (OUT = `run --out`):

    OUT/suite.json            spec name, source, fingerprint and cell ids (written when the store is opened)
    OUT/spec.toml             the spec text that wrote the store
    OUT/cells/<id>/           a committed cell: result.json (+ run/ and, when exported, vnncomp/)
    OUT/logs/<id>.log         every attempt's log lines and tracebacks, appended
    OUT/.staging/             cells being built, each owned by its attempt's lease (lease.py); what no live lease
                              owns is debris from a killed attempt, removed when a run starts and ends
    OUT/partial/<key>/        a finished training (run/ + train.json), kept until the cells using it commit, so
                              a cell killed or crashed during verification or export does not train again
                              (key = spec.training_key: the cell id, or one id for natural cells of all eps)
    OUT/.lock                 held (flock) by the one `run` process using the store
    OUT/.abscert-bench.json   the marker of a store (owned.py; stores of earlier versions are known by suite.json):
                              `--force` removes only the entries above (and table.md / table.csv of `compare`)

A cell is built in `.staging/<id>.<token>/`, its result.json written last, then the directory is renamed to
`cells/<id>`: a kill -9 at any moment leaves either no cell or a whole one. A committed cell whose status is
`done` or `stopped` (a time or memory cap) is never replaced; `failed` and `skipped` ones are retried on the
next run and replaced by the same rename.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..owned import MARKER, check_writable, is_kind, owned_names, report_kept, split_entries, store_kind, write_marker
from ..rundir import write_json
from .spec import Spec

STORE_FORMAT = "abscert-bench-suite/1"
COMPLETE = ("done", "stopped")
STATUSES = ("done", "stopped", "failed", "skipped")
STORE_ENTRIES = {"suite.json", "suite.json.tmp", "spec.toml", "spec.toml.tmp", "cells", "logs", ".staging", ".lock",
                 "tables", "plots", "partial"}
STORE_KIND = store_kind(STORE_ENTRIES | {"table.md", "table.csv"})  # the names --force removes (owned.py)
TRAINING_RECORD = "train.json"
CHECKPOINT_STUB = "checkpoint.pt.omitted.json"  # left by `slim` where a large checkpoint was taken out of a store"


class Store:
    """A suite's results directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.cells_dir = self.root / "cells"
        self.logs_dir = self.root / "logs"
        self.staging_dir = self.root / ".staging"
        self.partial_dir = self.root / "partial"
        self._lock_handle: Any = None

    # -- opening -----------------------------------------------------------------------------------------------
    def open(self, spec: Spec, force: bool = False) -> list[str]:
        """Lock the store, refuse one written by a different spec (unless force: wipe it); returns debris removed."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"results store {self.root} is not a directory")
        if self.root.is_dir() and not is_kind(self.root, STORE_KIND) and \
                any(p.name != ".lock" or p.stat().st_size for p in self.root.rglob("*") if not p.is_dir()):
            foreign = self.foreign_entries() or sorted(p.name for p in self.root.iterdir())
            raise UserError(f"{self.root} is not empty and is not a suite results store (it holds {foreign[0]!r}; "
                            f"no {MARKER} or suite.json), so even --force does not replace it; choose another --out "
                            "(nothing was deleted)")
        check_writable(self.root / ".lock")
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock()
        meta = None if force else self.metadata()
        if meta is not None:
            self._check_compatible(meta, spec)
        if force:  # only the store's own entries go (never .lock, held now); a user's files in it are kept
            from .lease import leases

            running = [lease for lease in leases(self.staging_dir) if lease.expired() is None]
            if running:  # an attempt of an earlier run (e.g. on a cluster whose client was killed) still works here
                self.unlock()
                raise UserError(f"{running[0].describe()} still runs cell {running[0].cell} in {self.root} "
                                f"({len(running)} live lease(s)); --force would delete its work: let it finish or "
                                f"stop it, then rerun (nothing was deleted)")
            owned, kept = split_entries(self.root, STORE_KIND)
            for child in owned:
                if child.name != ".lock":
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            report_kept(self.root, kept)
        if self.metadata() is None:  # a new store: its marker first, so even its skeleton is recognised
            write_marker(self.root, STORE_KIND, ["suite.json", "spec.toml", "cells", "logs", ".staging", ".lock"])
        for folder in (self.cells_dir, self.logs_dir, self.staging_dir):
            folder.mkdir(exist_ok=True)
        removed = self.clear_debris()
        if self.metadata() is None:
            tmp = self.root / "spec.toml.tmp"
            tmp.write_text(spec.text)
            os.replace(tmp, self.root / "spec.toml")
            write_json(self.root / "suite.json", {
                "format": STORE_FORMAT, "name": spec.name, "source": spec.source,
                "fingerprint": spec.fingerprint(), "cells": [c.id for c in spec.cells],
            })
        return removed

    def foreign_entries(self) -> list[str]:
        """Names in the store's directory that a store never writes (so it may be someone else's folder)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.name not in owned_names(self.root, STORE_KIND))

    def _check_compatible(self, meta: dict[str, Any], spec: Spec) -> None:
        if meta.get("format") != STORE_FORMAT:
            raise UserError(f"{self.root} holds a results store of format {meta.get('format')!r}, not "
                            f"{STORE_FORMAT}; pass --force to replace it")
        if meta.get("fingerprint") == spec.fingerprint():
            return
        old, new = set(meta.get("cells", [])), {c.id for c in spec.cells}
        detail = (f"{len(new - old)} cells only in this spec, {len(old - new)} only in the store"
                  if old != new else "same cells, different settings (epochs, options, verifiers, limits …)")
        raise UserError(f"results store {self.root} was written by spec {meta.get('name')!r} ({meta.get('source')}) "
                        f"and is incompatible with {spec.source} ({detail}); pass --force to discard it, "
                        "or choose another --out")

    def metadata(self) -> dict[str, Any] | None:
        """suite.json, or None when the store has none yet."""
        path = self.root / "suite.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{path} is corrupt; pass --force to replace the store") from None

    def lock(self) -> None:
        """Take the store's exclusive lock (released by the OS when this process dies, kill -9 included)."""
        if self._lock_handle is not None:
            return
        handle = open(self.root / ".lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(f"results store {self.root} is in use by another `abscert-bench run`") from None
        self._lock_handle = handle

    def unlock(self) -> None:
        """Release the lock."""
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    def clear_debris(self, workers: Any = None) -> list[str]:
        """Remove half-built cells left by killed attempts; returns their names. Whatever belongs to an attempt
        that still holds a live lease (see lease.py) is kept: that attempt is running, here or on a cluster.
        `workers(scheduler address)`: the workers that scheduler has now, to recognise dead Dask workers."""
        from .lease import LEASE_RE, live_attempts

        removed = []
        if self.staging_dir.exists():
            live = live_attempts(self.staging_dir, workers)
            for child in self.staging_dir.iterdir():
                if child.name in live or any(attempt in child.name for attempt in live):
                    continue
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
                if LEASE_RE.match(child.name) is None:
                    removed.append(child.name)
        return removed

    # -- cells -------------------------------------------------------------------------------------------------
    def cell_dir(self, cell_id: str) -> Path:
        """Where a committed cell lives."""
        return self.cells_dir / cell_id

    def log_path(self, cell_id: str) -> Path:
        """The cell's log file."""
        return self.logs_dir / f"{cell_id}.log"

    def result(self, cell_id: str) -> dict[str, Any] | None:
        """The committed result of a cell, or None if absent or unreadable."""
        return read_result(self.cell_dir(cell_id), cell_id)

    def is_complete(self, cell_id: str) -> bool:
        """Whether the cell has a committed `done`/`stopped` result (so a rerun skips it)."""
        result = self.result(cell_id)
        return result is not None and result["status"] in COMPLETE

    def results(self, cell_ids: list[str] | None = None) -> Iterator[tuple[Path, dict[str, Any]]]:
        """(cell directory, result) of every committed cell (or of the given ones), sorted by id."""
        if not self.cells_dir.exists():
            return
        names = sorted(p.name for p in self.cells_dir.iterdir()) if cell_ids is None else cell_ids
        for name in names:
            result = self.result(name)
            if result is not None:
                yield self.cell_dir(name), result

    def staging(self, cell_id: str, attempt: str | None = None) -> Path:
        """A fresh private directory to build a cell in (named after the attempt that owns it, see lease.py)."""
        path = self.staging_dir / f"{cell_id}.{attempt or uuid.uuid4().hex[:12]}"
        path.mkdir(parents=True)
        return path

    def commit(self, staging: Path, cell_id: str, result: dict[str, Any]) -> dict[str, Any]:
        """Write result.json last, then rename the staging directory into place; returns the result that won.

        A complete result already in place is kept (nothing is ever duplicated or overwritten); an incomplete
        one (failed / skipped / unreadable) is moved aside and replaced.
        """
        write_json(staging / "result.json", result)
        final = self.cell_dir(cell_id)
        trash = None
        existing = read_result(final, cell_id) if final.exists() else None
        if existing is not None and existing["status"] in COMPLETE:
            shutil.rmtree(staging, ignore_errors=True)
            return existing
        if final.exists():
            trash = self.staging_dir / f"{cell_id}.replaced.{uuid.uuid4().hex[:12]}"
            os.rename(final, trash)
        try:
            os.rename(staging, final)
        except OSError:  # another writer committed this cell between our check and the rename
            shutil.rmtree(staging, ignore_errors=True)
            winner = read_result(final, cell_id)
            return winner if winner is not None else result
        finally:
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        return result

    # -- finished training of cells not yet committed --------------------------------------------------------
    def saved_training(self, key: str, params: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
        """(run directory, training record) saved under `key` (see spec.training_key) with the same settings."""
        folder = self.partial_dir / key
        try:
            record = json.loads((folder / TRAINING_RECORD).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if not isinstance(record, dict) or record.get("params") != params:
            return None
        if not all((folder / "run" / name).exists() for name in ("checkpoint.pt", "metrics.csv", "config.json")):
            return None
        return folder / "run", record

    def save_training(self, key: str, run_dir: Path, record: dict[str, Any], attempt: str | None = None) -> None:
        """Keep a copy (hard links where possible) of a finished training under partial/<key>, atomically."""
        tmp = self.staging(key + ".training", attempt)
        link_tree(run_dir, tmp / "run")
        write_json(tmp / TRAINING_RECORD, record)
        self.partial_dir.mkdir(exist_ok=True)
        self.drop_training(key)
        try:
            os.rename(tmp, self.partial_dir / key)
        except OSError:  # another attempt saved it first: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)

    def drop_training(self, key: str) -> None:
        """Forget a saved training (once every cell that uses it is committed)."""
        folder = self.partial_dir / key
        if folder.exists():
            trash = self.staging_dir / f"{key}.dropped.{uuid.uuid4().hex[:12]}"
            os.rename(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def record(self, cell_id: str, result: dict[str, Any]) -> dict[str, Any]:
        """Commit a result with no files besides result.json (a cell that failed before it started, say)."""
        return self.commit(self.staging(cell_id), cell_id, result)


def link_tree(source: Path, target: Path) -> None:
    """Copy a directory tree, hard-linking files where the filesystem allows (the files are never modified)."""
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy)


def read_result(cell_dir: Path, cell_id: str | None = None) -> dict[str, Any] | None:
    """A cell directory's result.json if it is whole and consistent (a complete cell also needs its run files)."""
    try:
        result = json.loads((cell_dir / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(result, dict) or result.get("status") not in STATUSES:
        return None
    if cell_id is not None and result.get("id") != cell_id:
        return None
    run_dir = cell_dir / "run"
    if result["status"] == "done" and not ((run_dir / "checkpoint.pt").exists()
                                           or (run_dir / CHECKPOINT_STUB).exists()):
        return None
    return result


def slim_store(root: str | Path, max_mb: float) -> list[tuple[str, float]]:
    """Replace every committed checkpoint larger than `max_mb` MiB by a stub with its size and SHA-256, so a
    store can be committed to git; results, tables and resuming are unaffected (the cell stays complete), only
    re-checking or exporting that model needs it retrained. Returns (cell id, MiB) of what was taken out."""
    import hashlib

    store = Store(root)
    if not is_kind(store.root, STORE_KIND) or store.metadata() is None:
        raise UserError(f"{store.root} is not a results store written by `run` (no suite.json)")
    check_writable(store.cells_dir)
    removed = []
    for cell_dir, result in store.results():
        checkpoint = cell_dir / "run" / "checkpoint.pt"
        if not checkpoint.exists() or checkpoint.stat().st_size <= max_mb * 2**20:
            continue
        size = checkpoint.stat().st_size
        digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        write_json(cell_dir / "run" / CHECKPOINT_STUB, {
            "omitted": "checkpoint.pt", "bytes": size, "sha256": digest,
            "why": f"larger than {max_mb:g} MiB; rerun the cell (`run` with a fresh --out) to get it back",
        })
        checkpoint.unlink()
        removed.append((result["id"], size / 2**20))
    return removed
