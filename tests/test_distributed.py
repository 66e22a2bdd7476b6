"""Distributed safety on loopback: a store the workers do not see is refused; kill -9 of the client, of a worker
and of the scheduler of a `--scheduler` run, each followed by a rerun that loses nothing and trains nothing twice.
Plus the lease protocol itself (harness/lease.py) without Dask.

Every child process (scheduler, workers, clients) is started here with a bounded wait and killed in teardown.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from abscert_bench.errors import UserError
from abscert_bench.harness import Store, load_spec, run_suite
from abscert_bench.harness.cli import main as harness_main
from abscert_bench.harness.execute import run_cell
from abscert_bench.harness.lease import acquire, leases, owner_info

ROOT = Path(__file__).resolve().parents[1]

# Four independent cheap cells (distinct seeds: no shared training), each a few seconds of training so that a
# kill lands while cells run.
SPEC = """
name = "dist"
[grid]
datasets = ["digits"]
models = ["fc3"]
eps = [0.1]
seeds = [0, 1, 2, 3]
[train]
epochs = 150
limit = 300
[methods.natural]
[verify]
verifiers = ["ibp"]
limit = 5
"""
CELLS = [f"digits_fc3_eps0.1_natural_s{seed}" for seed in range(4)]


def child_env(**extra):
    path = os.pathsep.join([str(ROOT), str(ROOT / "baselines"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0", **extra}  # as the harness's LocalCluster


def wait_for(condition, timeout, what, poll=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Cluster:
    """`dask scheduler` and `dask worker --no-nanny` processes on 127.0.0.1; `stop()` kills whatever is left."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []
        self.scheduler = self._spawn("scheduler", [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host",
                                                   "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file",
                                                   str(root / "scheduler.json")], root)
        self.address = wait_for(self._address, 60, "the scheduler")

    def _address(self):
        try:
            return json.loads((self.root / "scheduler.json").read_text())["address"]
        except (OSError, ValueError, KeyError):
            return None

    def _spawn(self, name, argv, cwd):
        log = open(self.root / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, cwd=cwd, env=child_env(), stdout=log, stderr=log)
        log.close()
        self.procs.append(proc)
        return proc

    def add_workers(self, count: int = 1) -> None:
        """Start `count` single-threaded workers, each in its own working directory; wait until they joined."""
        from distributed import Client

        for _ in range(count):
            cwd = self.root / f"worker{len(self.workers)}"
            cwd.mkdir()
            self.workers.append(self._spawn(cwd.name, [
                sys.executable, "-m", "distributed.cli.dask_worker", self.address, "--nthreads", "1", "--no-nanny",
                "--no-dashboard", "--host", "127.0.0.1"], cwd))
        alive = sum(w.poll() is None for w in self.workers)
        with Client(self.address, timeout="30s") as client:
            client.wait_for_workers(alive, timeout=90)

    def kill(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)  # reaped: a zombie would look alive to a lease

    def stop(self) -> None:
        for proc in self.procs:
            self.kill(proc)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("distributed")
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.add_workers(2)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def children():
    """Processes a test starts (clients); killed at teardown whatever happened."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def write_spec(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(SPEC)
    return path


def rerun(spec_path, store, address):
    return run_suite(load_spec(spec_path), store, scheduler=address, progress=False, torch_threads=1)


def start_client(children, tmp_path, spec_path, store, address):
    log = open(tmp_path / "client.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "abscert_bench.harness", "run", str(spec_path), "--out", str(store),
                             "--scheduler", address, "--quiet", "--no-report", "--threads", "1"], cwd=tmp_path,
                            env=child_env(), stdout=log, stderr=log)
    log.close()
    children.append(proc)
    return proc


def running_leases(store: Path, count: int = 1):
    found = leases(store / ".staging")
    return found if len(found) >= count else None


def attempts(store: Path, cell_id: str) -> list[str]:
    """The log of each attempt of a cell that owned it (from its `=== attempt` line to the next)."""
    text = (store / "logs" / f"{cell_id}.log").read_text()
    return ["=== attempt" + part for part in text.split("=== attempt")[1:]]


def check_complete_and_trained_once(store: Path, deaths_allowed: int = 0) -> dict[str, int]:
    """Every cell done with its files; per cell exactly one attempt trained and finished (an attempt that
    started training and never finished is a killed one: at most `deaths_allowed` in all). No debris."""
    s = Store(store)
    trained = {}
    deaths = 0
    for cell_id in CELLS:
        result = s.result(cell_id)
        assert result is not None and result["status"] == "done", (cell_id, result)
        assert (store / "cells" / cell_id / "run" / "checkpoint.pt").exists()
        runs = [a for a in attempts(store, cell_id) if "train natural" in a]
        finished = [a for a in runs if "status done" in a]
        assert len(finished) == 1 and result["attempt"] in finished[0], (cell_id, runs)
        deaths += len(runs) - 1
        trained[cell_id] = len(runs)
        text = (store / "logs" / f"{cell_id}.log").read_text()
        assert "FileNotFoundError" not in text and "lost its lease" not in text  # no live folder deleted
    assert deaths <= deaths_allowed, trained
    wait_for(lambda: not list((store / ".staging").iterdir()), 15, "an empty .staging/")
    return trained


# -- the shared-store check -----------------------------------------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="needs /proc/self/cwd (Linux)")
def test_store_not_shared_is_refused(cluster, tmp_path, monkeypatch, capsys):
    """`/proc/self/cwd/store` is a different directory in each process (each worker has its own cwd): the
    client's store is invisible to the workers, as on a cluster without a shared filesystem."""
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    monkeypatch.chdir(client_dir)
    spec_path = write_spec(tmp_path)
    with pytest.raises(UserError, match=r"2 of 2 Dask worker\(s\) do not see the results store"):
        rerun(spec_path, "/proc/self/cwd/store", cluster.address)
    assert not list((client_dir / "store" / "cells").iterdir())
    assert not list((client_dir / "store" / ".staging").iterdir())  # the token file is gone too
    assert not any((cluster.root / f"worker{i}" / "store").exists() for i in range(2))  # nothing made there
    code = harness_main(["run", str(spec_path), "--out", "/proc/self/cwd/store", "--scheduler", cluster.address,
                         "--quiet", "--no-report"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("abscert-bench: error: ") and "no cell was run" in err


def test_worker_without_the_store_writes_nothing(tmp_path):
    """A task on a host that lacks the store (a worker that joined after the check) creates nothing there and
    says so; the client then records the cell failed instead of reporting it done."""
    params = load_spec(write_spec(tmp_path)).cells[0].params
    result = run_cell(params, CELLS[0], str(tmp_path / "nowhere"))
    assert result["status"] == "failed" and result["store_missing"] and "does not exist" in result["error"]
    assert not (tmp_path / "nowhere").exists()


# -- kill -9 during a --scheduler run -------------------------------------------------------------------------------
def test_kill_client_then_rerun(cluster, tmp_path, children):
    """The killed client's tasks go on running on the workers; the rerun waits for their leases instead of
    deleting their staging folders and training the same cells again."""
    spec_path, store = write_spec(tmp_path), tmp_path / "store"
    client = start_client(children, tmp_path, spec_path, store, cluster.address)
    running = wait_for(lambda: running_leases(store, 2) or client.poll() is not None, 120, "two running cells")
    client.send_signal(signal.SIGKILL)
    client.wait(timeout=30)
    assert running is not True, (tmp_path / "client.log").read_text()
    leased = {lease.cell for lease in running}
    report = rerun(spec_path, store, cluster.address)
    assert report.count("done") + len(report.already) == len(CELLS), report.summary()
    assert check_complete_and_trained_once(store) == dict.fromkeys(CELLS, 1)
    for cell_id in leased:  # the rerun found each of them committed or waited for the live attempt
        log = (store / "logs" / f"{cell_id}.log").read_text()
        assert cell_id in report.already or "waiting for the live attempt" in log or "committed by attempt" in log
        assert "took over" not in log


def test_kill_worker_then_rerun(cluster, tmp_path):
    """A worker killed mid-cell: its cell is recorded failed (the scheduler allows no retries, as the harness's
    LocalCluster), a cell queued on it that never started is run again, not failed; its staging folder is gone at
    the end of the same run; the rerun trains the killed cell once more and nothing else."""
    spec_path, store = write_spec(tmp_path), tmp_path / "store"
    victim = cluster.workers[0]
    killed: list[str] = []

    def kill_victim_mid_cell():
        def victim_lease():
            return next((lease for lease in leases(store / ".staging") if lease.data.get("pid") == victim.pid), None)
        try:
            lease = wait_for(victim_lease, 120, "a cell on the victim worker", poll=0.02)
            log = store / "logs" / f"{lease.cell}.log"
            wait_for(lambda: log.exists() and "train natural" in log.read_text(), 30, "its training", poll=0.02)
        except (AssertionError, OSError):
            return  # the test fails below: nothing was killed
        killed.append(lease.cell)
        cluster.kill(victim)

    killer = threading.Thread(target=kill_victim_mid_cell, daemon=True)
    killer.start()
    try:
        report = rerun(spec_path, store, cluster.address)
    finally:
        killer.join(timeout=150)
    assert killed and victim.poll() is not None, report.summary()
    assert not list((store / ".staging").iterdir()), "the killed worker's staging folder is cleaned by this run"
    failed = {cell_id for cell_id, r in report.ran.items() if r["status"] == "failed"}
    assert failed <= set(killed), report.summary()  # never a cell that had not started
    for cell_id in failed:
        assert "KilledWorker" in report.ran[cell_id]["error"] and "=== attempt" in \
            (store / "logs" / f"{cell_id}.log").read_text()
    again = rerun(spec_path, store, cluster.address)
    assert set(again.ran) == failed and again.count("done") == len(failed), again.summary()
    trained = check_complete_and_trained_once(store, deaths_allowed=1)
    assert all(count == 1 for cell_id, count in trained.items() if cell_id not in killed), trained
    cluster.add_workers(1)  # the replacement, for the next test


def test_kill_scheduler_then_rerun(cluster, tmp_path, children):
    """The scheduler killed mid-run: the client stops with a one-line error instead of hanging; a rerun on a new
    scheduler finishes every cell, training none twice."""
    spec_path, store = write_spec(tmp_path), tmp_path / "store"
    client = start_client(children, tmp_path, spec_path, store, cluster.address)
    wait_for(lambda: running_leases(store, 1) or client.poll() is not None, 120, "a running cell")
    cluster.kill(cluster.scheduler)
    client.wait(timeout=90)
    err = (tmp_path / "client.log").read_text().strip().splitlines()
    assert client.returncode == 2 and err[-1].startswith("abscert-bench: error: lost the Dask scheduler"), err
    for worker in cluster.workers:  # a worker that lost its scheduler ends on its own (its cell committed first)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            cluster.kill(worker)
    fresh = Cluster(tmp_path / "cluster2")
    try:
        fresh.add_workers(1)
        report = rerun(spec_path, store, fresh.address)
    finally:
        fresh.stop()
    assert report.count("done") + len(report.already) == len(CELLS), report.summary()
    check_complete_and_trained_once(store, deaths_allowed=len(CELLS))


# -- the lease protocol ---------------------------------------------------------------------------------------------
def test_a_live_lease_is_waited_for_and_never_shared(tmp_path):
    staging = tmp_path / ".staging"
    staging.mkdir()
    done = threading.Event()
    messages: list[str] = []
    first = acquire(staging, "cell", owner_info("a" * 16), done.is_set, messages.append)
    assert first is not None and first.generation == 1
    got = []
    waiter = threading.Thread(target=lambda: got.append(acquire(staging, "cell", owner_info("b" * 16), done.is_set,
                                                                messages.append, poll=0.05)))
    waiter.start()
    wait_for(lambda: any("waiting for the live attempt" in m for m in messages), 10, "the waiter")
    assert waiter.is_alive() and len(leases(staging, "cell")) == 1
    done.set()  # the first attempt commits the cell, then lets go of its lease
    first.release()
    waiter.join(timeout=10)
    assert got == [None] and not leases(staging, "cell")  # nothing to do: the cell is committed


def test_an_expired_lease_is_taken_over_and_its_folder_cleaned(tmp_path, monkeypatch):
    store = Store(tmp_path / "store")
    store.staging_dir.mkdir(parents=True)
    dead = store.staging(CELLS[0], "d" * 16)
    (dead / "run").mkdir()
    live = store.staging(CELLS[1], "e" * 16)
    old = {**owner_info("d" * 16), "host": "elsewhere", "heartbeat": time.time() - 120, "timeout_s": 60}
    (store.staging_dir / f"{CELLS[0]}.lease.1").write_text(json.dumps(old))
    fresh = {**owner_info("e" * 16), "host": "elsewhere", "heartbeat": time.time(), "timeout_s": 60}
    (store.staging_dir / f"{CELLS[1]}.lease.3").write_text(json.dumps(fresh))
    (store.staging_dir / "debris.0123").mkdir()
    # a dead process on this host expires its lease at once, heartbeat or not
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ghost = {**owner_info("f" * 16), "pid": int(gone.stdout), "heartbeat": time.time(), "timeout_s": 60}
    (store.staging_dir / f"{CELLS[2]}.lease.1").write_text(json.dumps(ghost))
    assert socket.gethostname() != "elsewhere"
    removed = store.clear_debris()
    assert sorted(removed) == sorted([f"{CELLS[0]}.{'d' * 16}", "debris.0123"])
    assert live.exists() and (store.staging_dir / f"{CELLS[1]}.lease.3").exists()  # a live attempt is kept
    (store.staging_dir / f"{CELLS[0]}.lease.1").write_text(json.dumps(old))
    messages: list[str] = []
    lease = acquire(store.staging_dir, CELLS[0], owner_info("g" * 16), lambda: False, messages.append)
    assert lease is not None and lease.generation == 2 and "took over the expired lease" in messages[0]
    assert [x.gen for x in leases(store.staging_dir, CELLS[0])] == [2]
    lease.release()


def test_force_refuses_while_a_live_attempt_works_in_the_store(tmp_path, capsys):
    """`run --force` would delete the staging folder of an attempt still running on a cluster: refused, untouched."""
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(SPEC.replace("seeds = [0, 1, 2, 3]", "seeds = [0]").replace("epochs = 150", "epochs = 1"))
    store = tmp_path / "store"
    assert harness_main(["run", str(spec_path), "--out", str(store), "--quiet"]) == 0
    live = Store(store).staging(CELLS[1], "e" * 16)
    (live / "run").mkdir()
    fresh = {**owner_info("e" * 16), "host": "elsewhere", "heartbeat": time.time(), "timeout_s": 60}
    (store / ".staging" / f"{CELLS[1]}.lease.1").write_text(json.dumps(fresh))
    capsys.readouterr()
    assert harness_main(["run", str(spec_path), "--out", str(store), "--force", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "still runs cell" in err[0] and "nothing was deleted" in err[0]
    assert (live / "run").is_dir() and (store / "cells" / CELLS[0] / "result.json").is_file()
