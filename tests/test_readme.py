"""The README's quick tour runs verbatim, and its test command is what CI runs."""
import re
import shlex
from pathlib import Path

from abscert_bench.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def quick_tour_commands() -> list[str]:
    section = README.split("## Quick tour", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("abscert-bench ")]


def test_quick_tour_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = quick_tour_commands()
    assert len(commands) >= 5
    for command in commands:
        assert main(shlex.split(command)[1:]) == 0, command
    table = capsys.readouterr().out
    assert "AbsCert paper check (not sound)" in table and "IBP bound" in table


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-2:]
    assert ci == ["make test", "make crosscheck"]  # the README's test command, then the external crosscheck
    section = README.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    assert "make test" in section and "make crosscheck" in section
