"""The bad-input battery (tests/bad_inputs_cases.py) as a table-driven test: every case is one clean error line.

Each bad input must give exit status 2, exactly one stderr line starting `abscert-bench: error: `, no traceback,
and leave every file that existed before unchanged. The accepted inputs are checked for their correct behaviour.
All calls are in-process (`abscert_bench.cli.main`); the fixtures are made once per module through the CLI.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from bad_inputs_cases import ACCEPTED, CASES, build_fixtures, lost_files, materialise, snapshot

from abscert_bench.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return build_fixtures(tmp_path_factory.mktemp("bad-input-fixtures"), main)


def _call(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # main returns 2 for argument errors; anything else escaping is a failure below
        return exc.code if isinstance(exc.code, int) else 1


def test_the_battery_is_big_enough():
    assert len(CASES) >= 200
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
    verbs = {c.argv[0] for c in CASES if c.argv}
    assert verbs >= {"train", "verify", "table", "compare", "demo", "data", "bench", "recheck", "export", "vnncomp",
                     "run", "run-table", "slim"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clean_error(case, fixtures, tmp_path, capsys, monkeypatch):
    argv = materialise(case, fixtures, tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = _call(argv)
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("abscert-bench: error: "), err
    assert case.fragment in lines[0]
    assert lost_files(before, snapshot(tmp_path)) == []


@pytest.mark.parametrize("case", ACCEPTED, ids=[a.id for a in ACCEPTED])
def test_accepted_input(case, fixtures, tmp_path, capsys, monkeypatch):
    argv = materialise(case, fixtures, tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = _call(argv)
    out, err = capsys.readouterr()
    case.check(tmp_path, code, out, err)
    assert lost_files(before, snapshot(tmp_path)) == []


def test_argument_errors_do_not_import_torch(tmp_path):
    """Argument and path errors are reported before torch is imported (they take milliseconds, not seconds)."""
    (tmp_path / "notes.txt").write_text("x")
    script = (
        "import sys\n"
        "from abscert_bench.cli import main\n"
        f"for argv in {_torch_free_argv(tmp_path)!r}:\n"
        "    assert main(argv) == 2, argv\n"
        "    assert 'torch' not in sys.modules, argv\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "baselines"),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert "Traceback" not in done.stderr


def _torch_free_argv(tmp: Path) -> list[list[str]]:
    notes = str(tmp / "notes.txt")
    return [
        ["train", "--epochs", "abc", "--out", str(tmp / "r")], ["train", "--device", "foo", "--out", str(tmp / "r")],
        ["train", "--out", notes], ["verify", str(tmp / "nope")], ["verify", notes], ["verify", str(tmp)],
        ["verify", str(tmp), "--limit", "0"], ["table", str(tmp), "--csv", str(tmp)],
        ["run", "spec.toml", "--scheduler", "notanaddress"], ["run-table", str(tmp), "--latex", str(tmp)],
        ["data", "list", "--data-root", notes], ["export", notes, "--out", str(tmp / "e")],
        ["vnncomp", "run", notes], ["slim", str(tmp), "--max-mb", "-1"], ["bench", "--epochs", "0"],
        ["compare", "--methods", "", "--out", str(tmp / "c")], ["nosuchverb"],
    ]


def test_error_after_progress_starts_on_its_own_line(tmp_path, capsys, monkeypatch):
    """A UserError raised while a tqdm bar is open is printed after the bar is closed (its own line)."""
    from tqdm import tqdm

    import abscert_bench.cli as cli
    from abscert_bench.errors import UserError

    def failing(args):
        bar = tqdm(total=10, desc="work", file=sys.stderr)
        bar.update(3)
        raise UserError("boom")

    monkeypatch.setattr(cli, "cmd_table", failing)  # build_parser binds the verb functions when it runs
    assert cli.main(["table", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").splitlines()[-1]
    assert last == "abscert-bench: error: boom"
    assert "work" not in last


def test_no_progress_bars_off_a_terminal(tmp_path, capsys):
    """stderr is not a TTY under pytest: train prints a plain line per epoch, verify no bar, --quiet nothing."""
    code = main(["train", "--method", "natural", "--model", "fc3", "--epochs", "2", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 0
    assert "\r" not in err
    assert err.splitlines() == [line for line in err.splitlines() if line.startswith("train natural: epoch ")]
    assert len(err.splitlines()) == 2
    assert main(["verify", str(tmp_path / "r"), "--verifiers", "ibp", "--limit", "5"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["train", "--method", "natural", "--model", "fc3", "--epochs", "1", "--quiet",
                 "--out", str(tmp_path / "q")]) == 0
    assert capsys.readouterr().err == ""


def test_every_verb_takes_quiet():
    from abscert_bench.cli import _all_parsers, build_parser

    leaves = _all_parsers(build_parser())
    assert len(leaves) >= 14
    for parser in leaves:
        assert any("--quiet" in a.option_strings for a in parser._actions), parser.prog


def test_known_library_warnings_are_filtered_narrowly(capsys):
    """The CLI hides the known third-party warnings by message, not every warning."""
    import warnings

    from abscert_bench.cli import KNOWN_WARNINGS, _filter_known_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _filter_known_warnings()
        warnings.warn("`torch.jit.script` is deprecated. Please switch to `torch.compile`", DeprecationWarning,
                      stacklevel=1)
        warnings.warn("Converting a tensor with requires_grad=True to a Python scalar", UserWarning, stacklevel=1)
        warnings.warn("something the user should see", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something the user should see"]
    assert all(category in (DeprecationWarning, UserWarning) for category, _ in KNOWN_WARNINGS)
