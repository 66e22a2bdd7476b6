"""`--force` replaces only what the tool itself made, the same rule for every verb that writes a folder (owned.py):
(a) a user's folder is refused even with --force and left untouched, (b) a folder the tool made is replaced on
--force with a user's file in it kept, (c) without --force an existing target is refused; plus writes into a
read-only folder, which end in one line `cannot write …` and leave nothing behind."""
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from abscert_bench.cli import main
from abscert_bench.owned import MARKER

TRAIN = ["train", "--method", "natural", "--model", "fc3", "--epochs", "1"]
SPEC = """
name = "tiny"
[grid]
datasets = ["digits"]
models = ["fc3"]
eps = [0.1]
[train]
epochs = 1
limit = 200
[methods.natural]
[verify]
verifiers = ["ibp"]
limit = 3
"""


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("abscert-bench: error")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(folder):
    """Every file under `folder` with its bytes (to show a folder untouched)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_folder(path):
    """An ordinary folder of someone's: thesis.tex and sub/data.bin."""
    (path / "sub").mkdir(parents=True)
    (path / "thesis.tex").write_text("\\documentclass{article}")
    (path / "sub" / "data.bin").write_bytes(b"\x00\x01precious")
    return path


def add_notes(folder):
    (folder / "MY_NOTES.txt").write_text("mine, keep")


def notes_kept(folder, err):
    assert (folder / "MY_NOTES.txt").read_text() == "mine, keep"
    assert "kept 1 entry" in err and "MY_NOTES.txt" in err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run directory made by `train` (FC3, 1 epoch, embedded digits), shared by the module."""
    run = tmp_path_factory.mktemp("force") / "run"
    assert main(TRAIN + ["--out", str(run)]) == 0
    return run


@pytest.fixture
def run_copy(trained, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(trained, target)
    return target


def _probe_blocked(folder):
    """Whether writes into a read-only `folder` are really refused (not as root, where chmod stops nothing)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return False
    except OSError:
        return True


@pytest.fixture
def read_only(tmp_path):
    """A folder with mode 0555 (restored afterwards); skips where that does not stop writes (root)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    made = []

    def make(path=folder):
        path.chmod(0o555)
        made.append(path)
        if not _probe_blocked(path):
            pytest.skip(f"a 0555 folder is writable here (uid {os.getuid()}: root ignores modes; run as another user "
                        "or under `setpriv --bounding-set=-dac_override,-dac_read_search` to check these)")
        return path

    yield make
    for path in made:
        path.chmod(0o755)


# -- train -------------------------------------------------------------------------------------------------------
def test_train_refuses_a_user_folder_even_with_force(tmp_path, capsys):
    folder = user_folder(tmp_path / "mine")
    before = snapshot(folder)
    for extra in ([], ["--force"]):
        one_line_error(*cli(capsys, *TRAIN, "--out", folder, *extra)[::2], "not a run directory", "nothing was deleted")
    assert snapshot(folder) == before


def test_train_force_replaces_its_run_directory_and_keeps_notes(run_copy, capsys):
    add_notes(run_copy)
    (run_copy / "verify").mkdir()
    (run_copy / "verify" / "old.json").write_text("{}")
    before = (run_copy / "checkpoint.pt").read_bytes()
    code, out, err = cli(capsys, *TRAIN, "--seed", "4", "--out", run_copy, "--force")
    assert code == 0, err
    notes_kept(run_copy, err)
    assert (run_copy / "checkpoint.pt").read_bytes() != before and not (run_copy / "verify").exists()
    marker = json.loads((run_copy / MARKER).read_text())
    assert marker["kind"] == "run" and "MY_NOTES.txt" not in marker["entries"]
    assert {"checkpoint.pt", "config.json", "metrics.csv"} <= set(marker["entries"])


def test_train_without_force_refuses_an_existing_run(run_copy, capsys):
    before = snapshot(run_copy)
    one_line_error(*cli(capsys, *TRAIN, "--out", run_copy)[::2], "already exists", "--force")
    assert snapshot(run_copy) == before


def test_train_force_recognises_an_older_run_directory(run_copy, capsys):
    """A run directory of an earlier version (no marker) is known by its config.json + checkpoint.pt."""
    (run_copy / MARKER).unlink()
    add_notes(run_copy)
    code, _, err = cli(capsys, *TRAIN, "--out", run_copy, "--force")
    assert code == 0, err
    notes_kept(run_copy, err)


def test_train_failure_keeps_the_users_files(run_copy, capsys, monkeypatch):
    import abscert_bench.training.loop as loop

    add_notes(run_copy)

    def broken(*args, **kwargs):
        (run_copy / "metrics.csv").write_text("half")
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(loop, "run_training", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        main(TRAIN + ["--out", str(run_copy), "--force"])
    assert sorted(p.name for p in run_copy.iterdir()) == ["MY_NOTES.txt"]


def test_train_into_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    one_line_error(*cli(capsys, *TRAIN, "--out", tmp_path / "f", "--force")[::2], "not a folder")
    assert (tmp_path / "f").read_text() == "x"


# -- verify ------------------------------------------------------------------------------------------------------
VERIFY = ["verify", "--verifiers", "ibp", "--limit", "5"]


def test_verify_never_replaces_a_file_it_did_not_write(run_copy, capsys):
    out_dir = run_copy / "verify" / "eps=0.1,first=5"
    user_folder(out_dir)
    (out_dir / "ibp.json").write_text('{"my": "numbers"}')
    before = snapshot(out_dir)
    for extra in ([], ["--force"]):
        one_line_error(*cli(capsys, *VERIFY, run_copy, *extra)[::2], "not a result abscert-bench wrote")
    assert snapshot(out_dir) == before


def test_verify_force_replaces_its_results_and_keeps_notes(run_copy, capsys):
    assert cli(capsys, *VERIFY, run_copy)[0] == 0
    out_dir = run_copy / "verify" / "eps=0.1,first=5"
    user_folder(out_dir)
    before = snapshot(out_dir)
    one_line_error(*cli(capsys, *VERIFY, run_copy)[::2], "exist", "--force")  # (c)
    assert snapshot(out_dir) == before
    stamp = out_dir / "ibp.json"
    stamp.write_text(stamp.read_text().replace('"samples": 5', '"samples": 999'))
    code, _, err = cli(capsys, *VERIFY, run_copy, "--force")
    assert code == 0, err
    assert json.loads(stamp.read_text())["samples"] == 5
    assert (out_dir / "thesis.tex").exists() and (out_dir / "sub" / "data.bin").read_bytes() == b"\x00\x01precious"


# -- export ------------------------------------------------------------------------------------------------------
def export(capsys, run, out, *extra):
    return cli(capsys, "export", run, "--out", out, "--samples", "2", "--timeout", "5", *extra)


def test_export_refuses_a_user_folder_even_with_force(trained, tmp_path, capsys):
    folder = user_folder(tmp_path / "mine")
    before = snapshot(folder)
    for extra in ([], ["--force"]):
        one_line_error(*export(capsys, trained, folder, *extra)[::2], "not a VNN-COMP benchmark folder")
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left


def test_export_force_replaces_its_folder_and_keeps_notes(trained, tmp_path, capsys):
    folder = tmp_path / "bench"
    assert export(capsys, trained, folder)[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask  # not tempfile.mkdtemp's 0700
    assert json.loads((folder / MARKER).read_text())["kind"] == "vnncomp-benchmark"
    add_notes(folder)
    before = snapshot(folder)
    one_line_error(*export(capsys, trained, folder)[::2], "already exists", "--force")  # (c)
    assert snapshot(folder) == before
    code, _, err = cli(capsys, "export", trained, "--out", folder, "--samples", "3", "--timeout", "5", "--force")
    assert code == 0, err
    notes_kept(folder, err)
    assert len((folder / "instances.csv").read_text().splitlines()) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]


def test_export_force_recognises_an_older_folder(trained, tmp_path, capsys):
    """An export of an earlier version (no marker) is known by its benchmark.json and its format."""
    folder = tmp_path / "bench"
    assert export(capsys, trained, folder)[0] == 0
    (folder / MARKER).unlink()
    add_notes(folder)
    code, _, err = export(capsys, trained, folder, "--force")
    assert code == 0, err
    notes_kept(folder, err)
    (folder / MARKER).unlink()
    (folder / "benchmark.json").write_text('{"format": "something else"}')
    one_line_error(*export(capsys, trained, folder, "--force")[::2], "not a VNN-COMP benchmark folder")


# -- vnncomp run -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench") / "bench"
    assert main(["export", str(trained), "--out", str(folder), "--samples", "2", "--timeout", "5"]) == 0
    return folder


def test_vnncomp_run_refuses_files_it_did_not_write(bench, tmp_path, capsys):
    mine = tmp_path / "mine.csv"
    mine.write_text("my,own,table\n")
    for extra in ([], ["--force"]):
        one_line_error(*cli(capsys, "vnncomp", "run", bench, "--out", mine, *extra)[::2], "mine.csv")
    assert mine.read_text() == "my,own,table\n"
    folder = user_folder(tmp_path / "results")  # the results folder of --out results.csv
    before = snapshot(folder)
    code, _, err = cli(capsys, "vnncomp", "run", bench, "--out", tmp_path / "results.csv", "--force")
    one_line_error(code, err, "not a vnncomp run results folder", "nothing was deleted")
    assert snapshot(folder) == before and not (tmp_path / "results.csv").exists()


def test_vnncomp_run_force_replaces_its_results_and_keeps_notes(bench, tmp_path, capsys):
    out = tmp_path / "r.csv"
    assert cli(capsys, "vnncomp", "run", bench, "--out", out)[0] == 0
    add_notes(tmp_path / "r")
    before = snapshot(tmp_path)
    one_line_error(*cli(capsys, "vnncomp", "run", bench, "--out", out)[::2], "exists", "--force")  # (c)
    assert snapshot(tmp_path) == before
    code, _, err = cli(capsys, "vnncomp", "run", bench, "--out", out, "--force")
    assert code == 0, err
    notes_kept(tmp_path / "r", err)
    assert len(out.read_text().splitlines()) == 3


# -- run / compare (the results store) ---------------------------------------------------------------------------
def run_spec(capsys, tmp_path, out, *extra, text=SPEC):
    spec = tmp_path / "tiny.toml"
    spec.write_text(text)
    return cli(capsys, "run", spec, "--out", out, "--quiet", "--no-report", *extra)


def test_run_refuses_a_user_folder_even_with_force(tmp_path, capsys):
    folder = user_folder(tmp_path / "mine")
    before = snapshot(folder)
    for extra in ([], ["--force"]):
        one_line_error(*run_spec(capsys, tmp_path, folder, *extra)[::2], "not a suite results store")
    assert snapshot(folder) == before


def test_run_force_replaces_its_store_and_keeps_notes(tmp_path, capsys):
    store = tmp_path / "store"
    assert run_spec(capsys, tmp_path, store)[0] == 0
    assert json.loads((store / MARKER).read_text())["kind"] == "store"
    add_notes(store)
    other = SPEC.replace("limit = 3", "limit = 4")
    code, _, err = run_spec(capsys, tmp_path, store, text=other)
    one_line_error(code, err, "incompatible", "--force")  # (c): a store of another spec needs --force
    code, _, err = run_spec(capsys, tmp_path, store, "--force", text=other)
    assert code == 0, err
    notes_kept(store, err)
    assert json.loads((store / "suite.json").read_text())["cells"] == ["digits_fc3_eps0.1_natural_s0"]


def test_run_force_recognises_an_older_store(tmp_path, capsys):
    """A store of an earlier version (no marker) is known by its suite.json."""
    store = tmp_path / "store"
    assert run_spec(capsys, tmp_path, store)[0] == 0
    (store / MARKER).unlink()
    add_notes(store)
    code, _, err = run_spec(capsys, tmp_path, store, "--force")
    assert code == 0, err
    notes_kept(store, err)


def test_compare_force_keeps_notes_and_refuses_a_user_folder(tmp_path, capsys):
    argv = ["compare", "--methods", "natural", "--model", "fc3", "--epochs", "1", "--limit", "3",
            "--verifiers", "ibp", "--out"]
    out = tmp_path / "cmp"
    assert cli(capsys, *argv, out)[0] == 0
    add_notes(out)
    code, _, err = cli(capsys, *argv, out, "--seed", "2", "--force")
    assert code == 0, err
    notes_kept(out, err)
    assert (out / "table.md").exists()
    folder = user_folder(tmp_path / "mine")
    before = snapshot(folder)
    one_line_error(*cli(capsys, *argv, folder, "--force")[::2], "not a suite results store")
    assert snapshot(folder) == before


def test_slim_refuses_a_user_folder(tmp_path, capsys):
    folder = user_folder(tmp_path / "mine")
    before = snapshot(folder)
    one_line_error(*cli(capsys, "slim", folder, "--max-mb", "0")[::2], "not a results store")
    assert snapshot(folder) == before


# -- read-only folders -------------------------------------------------------------------------------------------
def test_read_only_train(read_only, capsys):
    parent = read_only()
    one_line_error(*cli(capsys, *TRAIN, "--out", parent / "run")[::2], "cannot write")
    assert not any(parent.iterdir())


def test_read_only_verify(run_copy, read_only, capsys):
    read_only(run_copy)
    before = snapshot(run_copy)
    one_line_error(*cli(capsys, *VERIFY, run_copy)[::2], "cannot write")
    assert snapshot(run_copy) == before and not (run_copy / "verify").exists()


def test_read_only_export(trained, read_only, capsys):
    parent = read_only()
    one_line_error(*export(capsys, trained, parent / "bench")[::2], "cannot write")
    assert not any(parent.iterdir())


def test_read_only_vnncomp_run(bench, tmp_path, capsys, read_only):
    copy = tmp_path / "bench"
    shutil.copytree(bench, copy)
    read_only(copy)
    before = snapshot(copy)
    one_line_error(*cli(capsys, "vnncomp", "run", copy)[::2], "cannot write")
    assert snapshot(copy) == before and not (copy / "results").exists()


def test_read_only_run_and_slim(tmp_path, read_only, capsys):
    parent = read_only()
    one_line_error(*run_spec(capsys, tmp_path, parent / "store")[::2], "cannot write")
    assert not any(parent.iterdir())
    parent.chmod(0o755)
    store = parent / "store"
    assert run_spec(capsys, tmp_path, store)[0] == 0
    cells = store / "cells" / "digits_fc3_eps0.1_natural_s0" / "run"
    read_only(cells)
    one_line_error(*cli(capsys, "slim", store, "--max-mb", "0")[::2], "cannot write")
    assert (cells / "checkpoint.pt").exists()


def test_read_only_table_csv(trained, read_only, capsys):
    parent = read_only()
    one_line_error(*cli(capsys, "table", trained, "--csv", parent / "t.csv")[::2], "cannot write")
    assert not any(parent.iterdir())


# -- table --csv, run-table outputs: files and a plots folder ------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    (root / "tiny.toml").write_text(SPEC)
    assert main(["run", str(root / "tiny.toml"), "--out", str(root / "store"), "--quiet", "--no-report"]) == 0
    return root / "store"


def test_table_csv_replaces_only_its_own_csv(trained, tmp_path, capsys):
    mine = tmp_path / "mine.csv"
    mine.write_text("name,grade\nme,A\n")
    one_line_error(*cli(capsys, "table", trained, "--csv", mine)[::2], "not a table CSV")
    assert mine.read_text() == "name,grade\nme,A\n"
    ours = tmp_path / "t.csv"
    assert cli(capsys, "table", trained, "--csv", ours)[0] == 0
    ours.write_text(ours.read_text() + "stale\n")
    assert cli(capsys, "table", trained, "--csv", ours)[0] == 0 and "stale" not in ours.read_text()
    one_line_error(*cli(capsys, "table", trained, "--csv", tmp_path)[::2], "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.csv", "t.csv"]


def test_run_table_outputs_replace_only_their_own(store, tmp_path, capsys):
    for option in ("--markdown", "--latex"):
        mine = tmp_path / f"mine{option}"
        mine.write_text("my own text\n")
        code, out, err = cli(capsys, "run-table", store, option, mine)
        one_line_error(code, err, "is not a", "nothing was changed")
        assert mine.read_text() == "my own text\n" and out == ""
        ours = tmp_path / f"ours{option}"
        assert cli(capsys, "run-table", store, option, ours)[0] == 0
        assert cli(capsys, "run-table", store, option, ours)[0] == 0  # its own file: rewritten
    folder = user_folder(tmp_path / "figs")
    before = snapshot(folder)
    one_line_error(*cli(capsys, "run-table", store, "--plots", folder)[::2], "not a plots folder")
    assert snapshot(folder) == before
    plots = tmp_path / "plots"
    assert cli(capsys, "run-table", store, "--plots", plots)[0] == 0
    assert json.loads((plots / MARKER).read_text())["kind"] == "plots"
    add_notes(plots)
    assert cli(capsys, "run-table", store, "--plots", plots)[0] == 0
    assert (plots / "MY_NOTES.txt").read_text() == "mine, keep"
    assert "MY_NOTES.txt" not in json.loads((plots / MARKER).read_text())["entries"]


def test_read_only_run_table(store, read_only, capsys):
    parent = read_only()
    for option, name in (("--markdown", "t.md"), ("--latex", "t.tex"), ("--plots", "plots")):
        one_line_error(*cli(capsys, "run-table", store, option, parent / name)[::2], "cannot write")
    assert not any(parent.iterdir())


# -- the committed results of earlier versions are recognised (and ordinary folders are not) ----------------------
def test_committed_results_are_recognised(tmp_path):
    from pathlib import Path

    from abscert_bench.harness.store import STORE_KIND
    from abscert_bench.owned import EXPORT, PLOTS, RUN, is_kind

    results = Path(__file__).resolve().parent.parent / "results"
    stores = [p.parent for p in results.glob("*/suite.json")]
    assert stores
    for store in stores:
        assert is_kind(store, STORE_KIND) and not is_kind(store, RUN) and not is_kind(store, EXPORT)
        assert is_kind(store / "plots", PLOTS)
        for cell in (store / "cells").iterdir():
            assert is_kind(cell / "run", RUN)
    for config in results.glob("mnist-official/*/config.json"):
        assert is_kind(config.parent, RUN)
    mine = user_folder(tmp_path / "mine")
    (mine / "config.json").write_text('{"dataset": "mine"}')
    (mine / "suite.json").write_text('{"name": "mine"}')
    (mine / "benchmark.json").write_text('{"format": 1}')
    assert not any(is_kind(mine, kind) for kind in (RUN, EXPORT, STORE_KIND, PLOTS))


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("setpriv") is None,
                    reason="only as root with setpriv: elsewhere the read-only cases above run themselves")
def test_unwritable_cases_rerun_as_root_without_the_override_capability():
    """CI runs as root, where a 0555 folder stops nothing: run the read-only cases again in a child whose
    capability bounding set lacks CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, so the modes hold, and require that
    none of them skipped."""
    done = subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m", "pytest", "-q", "-rs",
         "-p", "no:cacheprovider", str(Path(__file__)), "-k", "read_only"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "7 passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]
