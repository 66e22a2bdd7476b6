"""The validation layer in front of every verb: argparse types, output-path checks, run-directory config.json
and result files read back. Everything here is torch-free and turns bad input into a UserError (or, at parse
time, argparse's own error), which the CLI prints as one line `abscert-bench: error: …` with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from .errors import UserError

PROG = "abscert-bench"


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line `abscert-bench: error: VERB: message`, exit 2 (no usage)."""

    def error(self, message: str) -> NoReturn:
        verb = self.prog[len(PROG):].strip()
        hint = f" (see {self.prog} --help)"
        print(f"{PROG}: error: {verb + ': ' if verb else ''}{message}{hint}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------- argparse types
def _number(kind: Callable[[str], Any], text: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _within(kind: Callable[[str], Any], text: str, ok: Callable[[Any], bool], message: str) -> Any:
    """`text` as a finite `kind` for which `ok` holds, else an argparse error `message` (formatted with the value)."""
    value = _number(kind, text)
    if not ok(value):
        raise argparse.ArgumentTypeError(message.format(value))
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _within(int, text, lambda v: v >= 1, "must be >= 1, got {}")


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    return _within(int, text, lambda v: v >= 0, "must be >= 0, got {}")


def finite_float(text: str) -> float:
    """Any finite float (ranges are checked where the value is used, with the message of that check)."""
    return _number(float, text)


def positive_float(text: str) -> float:
    """A finite float > 0."""
    return _within(float, text, lambda v: v > 0, "must be > 0, got {:g}")


def nonneg_float(text: str) -> float:
    """A finite float >= 0."""
    return _within(float, text, lambda v: v >= 0, "must be >= 0, got {:g}")


def unit_float(text: str) -> float:
    """A float in [0, 1]."""
    return _within(float, text, lambda v: 0 <= v <= 1, "must be in [0, 1], got {:g}")


DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def device(text: str) -> str:
    """cpu, cuda, cuda:N or mps (whether it exists is checked where torch is loaded)."""
    if not DEVICE_RE.match(text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def name_list(text: str) -> list[str]:
    """A comma-separated list of names: at least one, none twice (empty items from stray commas are dropped)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of names, got {text!r}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{', '.join(twice)} listed twice")
    return names


def directory_arg(text: str) -> str:
    """A folder that may not exist yet but is not a file (data roots)."""
    if text == "":
        raise argparse.ArgumentTypeError("expected a folder, got ''")
    check_dir_target(Path(text), "folder", argparse.ArgumentTypeError)
    return text


SCHEDULER_RE = re.compile(r"^(?:(?P<scheme>[a-z][a-z0-9+.-]*)://)?(?P<host>\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(?P<port>\d+)/?$")
SCHEDULER_SCHEMES = {"tcp", "tls", "ws", "wss", "ucx"}


def scheduler_address(text: str) -> str:
    """A Dask scheduler address: [tcp|tls|ws|wss|ucx://]host:port, checked before anything is created."""
    match = SCHEDULER_RE.match(text)
    if match is None or (match["scheme"] is not None and match["scheme"] not in SCHEDULER_SCHEMES) \
            or not 1 <= int(match["port"]) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a scheduler address such as tcp://host:8786, got {text!r}")
    return text


# ------------------------------------------------------------------------------------------ output paths
def _first_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_dir_target(path: Path, what: str, error: type[Exception] = UserError) -> None:
    """A folder to create or reuse: it must not be a file, nor lie under one."""
    existing = _first_existing(path)
    if existing == path and not path.is_dir():
        raise error(f"{what} {path} exists and is not a folder")
    if existing != path and not existing.is_dir():
        raise error(f"{what} {path}: {existing} is a file, not a folder")


def check_file_target(path: Path, what: str) -> None:
    """A file to write: not a folder, in an existing folder."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file name")
    if path.parent.exists() and not path.parent.is_dir():
        raise UserError(f"{what} {path}: {path.parent} is a file, not a folder")
    if not path.parent.is_dir():
        raise UserError(f"{what} {path}: folder {path.parent} does not exist")


def check_input_dir(path: Path, what: str) -> None:
    """An existing folder to read."""
    if not path.exists():
        raise UserError(f"no such {what} {path}")
    if not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder")


# ------------------------------------------------------------------------------------------ files read back
def read_text_file(path: Path, what: str = "") -> str:
    """The text of `path`; a missing, unreadable or binary file is a one-line UserError (`what`: e.g. 'spec')."""
    named = f"{what} {path}" if what else str(path)
    try:
        return path.read_text()
    except FileNotFoundError:
        raise UserError(f"no such {what} file {path}" if what else f"missing {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"{named} is not a text file (binary or corrupt)") from None
    except OSError as exc:
        raise UserError(f"cannot read {named}: {exc.strerror or exc}") from None


def read_json_file(path: Path, kind: type | None = dict) -> Any:
    """JSON from `path` (of type `kind`; None: any); missing, unreadable, binary or malformed files are a UserError."""
    text = read_text_file(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"malformed JSON in {path}: line {exc.lineno}") from None
    if kind is not None and not isinstance(data, kind):
        raise UserError(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}, "
                        f"got {type(data).__name__}")
    return data


def is_number(value: Any) -> bool:
    """A JSON number (not a bool), finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_fields(data: dict[str, Any], path: Path, required: dict[str, Callable[[Any], bool]],
                 optional: dict[str, Callable[[Any], bool]] | None = None) -> dict[str, Any]:
    """Every required key present and of the right kind, every optional key of the right kind."""
    for key, ok in required.items():
        if key not in data:
            raise UserError(f"{path}: missing field {key!r}")
        if not ok(data[key]):
            raise UserError(f"{path}: bad value for {key!r}: {data[key]!r}")
    for key, ok in (optional or {}).items():
        if key in data and data[key] is not None and not ok(data[key]):
            raise UserError(f"{path}: bad value for {key!r}: {data[key]!r}")
    return data


def _text(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _eps(value: Any) -> bool:
    return is_number(value) and 0 <= value <= 1


def _shape(value: Any) -> bool:
    return isinstance(value, list) and all(is_int(v) and v > 0 for v in value)


RUN_CONFIG_REQUIRED: dict[str, Callable[[Any], bool]] = {"dataset": _text, "model": _text, "method": _text,
                                                         "eps": _eps}
RUN_CONFIG_OPTIONAL: dict[str, Callable[[Any], bool]] = {
    "method_options": lambda v: isinstance(v, dict), "input_shape": _shape,
    "num_classes": lambda v: is_int(v) and v > 0, "epochs": lambda v: is_int(v) and v > 0,
    "protocol": _text, "cells": lambda v: is_int(v) and v > 0, "budget_s": is_number,
}


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """config.json of a run directory, checked (the fields verify, export and table rely on)."""
    check_input_dir(run_dir, "run directory")
    path = run_dir / "config.json"
    if not path.exists():
        raise UserError(f"{run_dir} is not a run directory (no config.json)")
    return check_fields(read_json_file(path), path, RUN_CONFIG_REQUIRED, RUN_CONFIG_OPTIONAL)


VERIFIER_SUMMARY_REQUIRED: dict[str, Callable[[Any], bool]] = {
    "verifier": _text, "samples": lambda v: is_int(v) and v >= 0, "verified_fraction": is_number,
    "falsified": lambda v: is_int(v) and v >= 0, "unknown": lambda v: is_int(v) and v >= 0,
    "time_mean_s": is_number,
}


def read_verifier_summary(path: Path) -> dict[str, Any]:
    """A `<verifier>.json` written by verify, checked."""
    summary = check_fields(read_json_file(path), path, VERIFIER_SUMMARY_REQUIRED,
                           {"falsified_fraction": is_number, "attack_only": lambda v: isinstance(v, bool)})
    if summary.get("attack_only") and "falsified_fraction" not in summary:
        raise UserError(f"{path}: missing field 'falsified_fraction'")
    return summary


def read_csv_file(path: Path) -> list[dict[str, str]]:
    """A CSV file as dicts; unreadable or binary files are a UserError."""
    import csv

    try:
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    except FileNotFoundError:
        raise UserError(f"missing {path}") from None
    except (UnicodeDecodeError, csv.Error):
        raise UserError(f"{path} is not a readable CSV file (binary or corrupt)") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def float_field(row: dict[str, Any], key: str, path: Path, line: int) -> float:
    """row[key] as a float, or a UserError naming the file and line."""
    try:
        return float(row[key])
    except KeyError:
        raise UserError(f"{path}: line {line}: missing column {key!r}") from None
    except (TypeError, ValueError):
        raise UserError(f"{path}: line {line}: {key} is not a number: {row[key]!r}") from None


def check_inside(folder: Path, rel: str, where: str) -> Path:
    """folder/rel, refusing absolute paths and paths that leave `folder` (../../etc/passwd)."""
    candidate = Path(rel)
    if candidate.is_absolute() or rel.startswith("~"):
        raise UserError(f"{where}: path {rel!r} must be relative to the benchmark folder")
    root = folder.resolve()
    target = (folder / candidate).resolve()
    if target != root and root not in target.parents:
        raise UserError(f"{where}: path {rel!r} points outside the benchmark folder {folder}")
    return folder / candidate
