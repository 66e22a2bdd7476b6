"""Leases: a cell attempt owns the cell, and its staging folder, while it runs.

A lease is a small JSON file `OUT/.staging/<cell id>.lease.<generation>` (owner host, pid and process start
time, attempt id, Dask worker and scheduler addresses, heartbeat time, timeout). It is created whole by one
hard link (O_EXCL semantics: of two attempts creating the same generation, exactly one wins), refreshed every
`timeout / 6` seconds by a thread of the running attempt, and removed when the attempt ends. A lease is
*live* unless it is expired: no heartbeat for longer than its timeout, or its owner process is gone (same
host, pid dead, a zombie, or a different process under that pid), or (seen by a client or task of the same
Dask scheduler) its worker is no longer in the scheduler. An attempt that finds a live lease on its cell
waits for it; one that finds an expired lease takes over the next generation, then deletes the dead
attempt's files. Every file or folder an attempt leaves in `.staging/` carries its attempt id in its name, so
`Store.clear_debris` keeps everything of a live attempt and removes the rest.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TIMEOUT_ENV = "ABSCERT_LEASE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60.0
LEASE_RE = re.compile(r"^(?P<cell>.+)\.lease\.(?P<gen>\d+)$")


class LeaseLost(Exception):
    """Raised inside an attempt whose lease was taken over (it stalled past the timeout): it must stop."""


def lease_timeout() -> float:
    """Seconds without a heartbeat after which a lease is expired ($ABSCERT_LEASE_TIMEOUT_S, default 60)."""
    try:
        return max(1.0, float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def new_attempt_id() -> str:
    """A fresh attempt id (16 hex digits, never found by chance in another name)."""
    return uuid.uuid4().hex[:16]


def process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, /proc), None where unknown; "" for a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return "" if fields[0] in ("Z", "X") else fields[19]


def owner_gone(host: str, pid: int, start: str | None) -> bool:
    """Whether the process that wrote a lease certainly no longer exists (only decidable on its own host)."""
    if host != socket.gethostname() or not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    now = process_start(pid)
    return now == "" or (start is not None and now is not None and now != start)


@dataclass
class LeaseFile:
    """One lease file as read from disk."""

    path: Path
    cell: str
    gen: int
    data: dict[str, Any]  # {} when unreadable (being written, or torn)

    @property
    def attempt(self) -> str:
        return str(self.data.get("attempt", ""))

    def expired(self, now: float | None = None, workers: Callable[[str], Iterable[str] | None] | None = None
                ) -> str | None:
        """Why this lease is expired, or None while it is live. `workers(scheduler)` gives the addresses of the
        workers that scheduler has now (None when unknown)."""
        now = time.time() if now is None else now
        data = self.data
        if not data:
            try:
                age = now - self.path.stat().st_mtime
            except OSError:
                return "removed"
            return f"unreadable for {age:.0f} s" if age > lease_timeout() else None
        age = now - float(data.get("heartbeat", 0.0))
        timeout = float(data.get("timeout_s", lease_timeout()))
        if age > timeout:
            return f"no heartbeat for {age:.0f} s (timeout {timeout:g} s)"
        if owner_gone(str(data.get("host", "")), int(data.get("pid", 0)), data.get("pid_start")):
            return f"its process {data.get('pid')} on {data.get('host')} is gone"
        if workers is not None and data.get("worker") and data.get("scheduler"):
            alive = workers(str(data["scheduler"]))
            if alive is not None and data["worker"] not in alive:
                return f"its Dask worker {data['worker']} left the scheduler"
        return None

    def describe(self) -> str:
        data = self.data
        return (f"attempt {data.get('attempt', '?')} on {data.get('host', '?')} pid {data.get('pid', '?')}"
                + (f" (worker {data['worker']})" if data.get("worker") else ""))


def read_lease(path: Path) -> LeaseFile | None:
    """The lease at `path` (data {} when unreadable), None when the name is not a lease's or the file is gone."""
    match = LEASE_RE.match(path.name)
    if match is None:
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            data = {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        data = {}
    return LeaseFile(path, match["cell"], int(match["gen"]), data)


def leases(staging_dir: Path, cell_id: str | None = None) -> list[LeaseFile]:
    """Every lease in `staging_dir` (of one cell, when given), by cell and generation."""
    try:
        names = os.listdir(staging_dir)
    except OSError:
        return []
    found = []
    for name in names:
        if ".lease." not in name or (cell_id is not None and not name.startswith(cell_id + ".lease.")):
            continue
        lease = read_lease(staging_dir / name)
        if lease is not None and (cell_id is None or lease.cell == cell_id):
            found.append(lease)
    return sorted(found, key=lambda lease: (lease.cell, lease.gen))


def live_attempts(staging_dir: Path, workers: Callable[[str], Iterable[str] | None] | None = None) -> set[str]:
    """Attempt ids of the live leases in `staging_dir`, and the names of those lease files."""
    live = set()
    for lease in leases(staging_dir):
        if lease.expired(workers=workers) is None:
            live.add(lease.path.name)
            if lease.attempt:
                live.add(lease.attempt)
    return live


def remove_attempt_files(staging_dir: Path, attempt: str) -> None:
    """Delete every entry of `staging_dir` that belongs to `attempt` (its staging folder, temporary files)."""
    if not attempt:
        return
    try:
        names = os.listdir(staging_dir)
    except OSError:
        return
    for name in names:
        if attempt in name and LEASE_RE.match(name) is None:
            path = staging_dir / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def owner_info(attempt: str, submission: str | None = None) -> dict[str, Any]:
    """The owner fields of a lease written by this process."""
    info: dict[str, Any] = {"attempt": attempt, "submission": submission, "host": socket.gethostname(),
                            "pid": os.getpid(), "pid_start": process_start(os.getpid()), "worker": None,
                            "scheduler": None}
    try:
        from distributed import get_worker

        worker = get_worker()
        info["worker"] = worker.address
        info["scheduler"] = worker.scheduler.address
    except (ImportError, ValueError, AttributeError):
        pass
    return info


def scheduler_workers() -> Callable[[str], Iterable[str] | None] | None:
    """In a Dask task: a function giving the current workers of this worker's scheduler (None elsewhere)."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None

    def workers(address: str) -> Iterable[str] | None:
        if address != worker.scheduler.address:
            return None
        try:
            from distributed import get_client

            return set(get_client().scheduler_info()["workers"])
        except Exception:  # noqa: BLE001  no answer: decide on heartbeats only
            return None

    return workers


def _create(path: Path, text: str, tmp: Path) -> bool:
    """Create `path` holding `text` unless it exists (False then); whole at once (a hard link of `tmp`) where the
    filesystem has hard links, else by O_EXCL (a reader may then see it empty for a moment: still live)."""
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        return True
    finally:
        tmp.unlink(missing_ok=True)


class Lease:
    """A held lease: a heartbeat thread refreshes it; `release()` removes it."""

    def __init__(self, path: Path, data: dict[str, Any], thread_id: int | None = None) -> None:
        self.path = path
        self.data = data
        self.lost = False
        self._thread_id = thread_id if thread_id is not None else threading.get_ident()
        self._done = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def attempt(self) -> str:
        return str(self.data["attempt"])

    @property
    def generation(self) -> int:
        match = LEASE_RE.match(self.path.name)
        return int(match["gen"]) if match else 0

    def owned(self) -> bool:
        """Whether the lease file is still ours (a takeover deletes it)."""
        lease = read_lease(self.path)
        return lease is not None and lease.attempt == self.attempt

    def refresh(self) -> bool:
        """Write a new heartbeat; False (and `lost`) when the lease was taken over."""
        if not self.owned():
            self.lost = True
            return False
        self.data["heartbeat"] = time.time()
        tmp = self.path.with_name(f"{self.path.name}.hb.{self.attempt}")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)
        return True

    def start_heartbeat(self) -> None:
        """Refresh every timeout/6 s in a daemon thread; a lost lease raises LeaseLost in the attempt's thread."""
        interval = max(0.2, float(self.data["timeout_s"]) / 6)

        def beat() -> None:
            from .watchdog import _raise_in

            while not self._done.wait(interval):
                try:
                    if not self.refresh():
                        _raise_in(self._thread_id, LeaseLost)
                        return
                except OSError:
                    pass  # a transient filesystem error: try again at the next beat

        self._beat = threading.Thread(target=beat, name="abscert-lease-heartbeat", daemon=True)
        self._beat.start()

    def stop_heartbeat(self) -> None:
        """Stop refreshing (and cancel a LeaseLost not yet raised in the attempt's thread)."""
        self._done.set()
        if self._beat is not None:
            self._beat.join()
            if self.lost and threading.get_ident() == self._thread_id:
                from .watchdog import _raise_in

                _raise_in(self._thread_id, None)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease (if it is still ours)."""
        self.stop_heartbeat()
        if self.owned():
            self.path.unlink(missing_ok=True)


def acquire(staging_dir: Path, cell_id: str, info: dict[str, Any], complete: Callable[[], bool],
            log: Callable[[str], None], poll: float = 0.5) -> Lease | None:
    """Take the cell's lease for the attempt described by `info` (see owner_info); wait while another attempt
    holds a live one. Returns None, holding nothing, once `complete()` says the cell is committed."""
    timeout = lease_timeout()
    workers = scheduler_workers()
    announced = None
    while True:
        if complete():
            return None
        current = leases(staging_dir, cell_id)
        live = [lease for lease in current if lease.expired(workers=workers) is None]
        if live:
            if announced != live[0].path.name:
                log(f"waiting for the live {live[0].describe()} (lease {live[0].path.name})")
                announced = live[0].path.name
            time.sleep(poll)
            continue
        gen = max((lease.gen for lease in current), default=0) + 1
        data = {**info, "cell": cell_id, "heartbeat": time.time(), "timeout_s": timeout,
                "acquired": time.time()}
        path = staging_dir / f"{cell_id}.lease.{gen}"
        if not _create(path, json.dumps(data), staging_dir / f"{cell_id}.lease-new.{info['attempt']}"):
            continue
        lease = Lease(path, data)
        # Another attempt may have won a lower generation meanwhile (it read the directory later): it keeps the cell.
        rivals = [other for other in leases(staging_dir, cell_id)
                  if other.gen < gen and other.attempt != lease.attempt and other.expired(workers=workers) is None]
        if rivals:
            lease.release()
            continue
        for old in current:  # expired: take over, deleting the dead attempt's files (re-read: still that attempt?)
            again = read_lease(old.path)
            if again is not None and again.attempt == old.attempt:
                log(f"took over the expired lease {old.path.name} of {old.describe()}: {old.expired(workers=workers)}")
                remove_attempt_files(staging_dir, old.attempt)
                old.path.unlink(missing_ok=True)
        if complete():  # committed by the attempt that released its lease just before we took it
            lease.release()
            return None
        lease.start_heartbeat()
        return lease
