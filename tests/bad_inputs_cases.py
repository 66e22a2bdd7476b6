"""The bad-input battery as data: every case is argv for `abscert-bench` plus, optionally, a setup that writes
small fixture files (corrupt JSON, a binary spec, truncated data, a malicious instances.csv …).

Each case in CASES must end with exit status 2, exactly one stderr line starting `abscert-bench: error: `, no
traceback, and every file that existed before the call unchanged. ACCEPTED holds inputs that look odd but are
legitimately accepted, each with a check of the correct behaviour. Used by tests/test_bad_inputs.py and
benchmarks/fault_battery.py (which also runs it against older commits, so nothing here imports the code under test
at module level).

Placeholders in argv: {tmp} a fresh empty folder for the case; {run} a private copy of a tiny trained run (fc3,
1 epoch, verified with ibp on 10 images); {bench} a private copy of that run's exported VNN-COMP folder; {store}
a private copy of a one-cell results store; {spec} a valid one-cell spec; {file} an ordinary user file
({tmp}/notes.txt). A setup(tmp) runs after the copies exist and before the call.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SPEC_TEXT = """name = "tiny"
[grid]
datasets = ["digits"]
models = ["fc3"]
eps = [0.1]
seeds = [0]
[train]
epochs = 1
[methods.natural]
[verify]
verifiers = ["ibp"]
limit = 5
"""

# Verbs whose typical bad inputs can be combined with "fast" settings, so a case the code wrongly accepts still
# finishes in a second or two instead of training a real model.
FAST_TRAIN = ["--model", "fc3", "--epochs", "1"]
FAST_COMPARE = ["--methods", "natural", "--model", "fc3", "--epochs", "1", "--limit", "5", "--verifiers", "ibp"]


@dataclass
class Case:
    """One bad input: argv (with placeholders) and an optional setup writing fixture files into {tmp}."""

    id: str
    argv: list[str]
    setup: Callable[[Path], None] | None = None
    fragment: str = ""  # when given, the error line must contain it


@dataclass
class Accepted:
    """An input that is accepted on purpose; check(tmp, code, out, err) asserts the correct behaviour."""

    id: str
    argv: list[str]
    check: Callable[[Path, int, str, str], None]
    setup: Callable[[Path], None] | None = None
    notes: str = ""


@dataclass
class Fixtures:
    """Paths of the shared, read-only originals that cases get private copies of."""

    root: Path
    run: Path
    bench: Path
    store: Path
    spec: Path
    extra: dict[str, Path] = field(default_factory=dict)


def build_fixtures(root: Path, main: Callable[[Sequence[str]], int]) -> Fixtures:
    """Train, verify, export and run the tiny fixtures once through the CLI `main`."""
    root.mkdir(parents=True, exist_ok=True)
    run, bench, store, spec = root / "run", root / "bench", root / "store", root / "tiny.toml"
    steps = [
        ["train", "--method", "natural", "--model", "fc3", "--epochs", "1", "--out", str(run)],
        ["verify", str(run), "--verifiers", "ibp", "--limit", "10"],
        ["export", str(run), "--out", str(bench), "--samples", "1"],
    ]
    spec.write_text(SPEC_TEXT)
    steps.append(["run", str(spec), "--out", str(store), "--no-report", "--quiet"])
    for argv in steps:
        code = main(argv)
        if code != 0:
            raise RuntimeError(f"fixture step failed ({code}): {argv}")
    return Fixtures(root, run, bench, store, spec)


def materialise(case: Case | Accepted, fixtures: Fixtures, tmp: Path) -> list[str]:
    """Make the case's private copies and files in `tmp`; return argv with the placeholders filled in."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "notes.txt").write_text("my notes\n")
    text = " ".join(case.argv)
    values = {"tmp": str(tmp), "file": str(tmp / "notes.txt"), "spec": str(tmp / "tiny.toml")}
    for name in ("run", "bench", "store"):
        values[name] = str(tmp / name)
        if "{" + name + "}" in text or case.setup is not None:
            shutil.copytree(getattr(fixtures, name), tmp / name)
    shutil.copyfile(fixtures.spec, tmp / "tiny.toml")
    if case.setup is not None:
        case.setup(tmp)
    return [a.format(**values) for a in case.argv]


def snapshot(root: Path) -> dict[str, str]:
    """relative path → SHA-256 of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def lost_files(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Files that existed before and are gone or changed."""
    return sorted(k for k, v in before.items() if after.get(k) != v)


def classify(code: int | None, err: str, raised: BaseException | None) -> str:
    """clean | traceback | accepted | other."""
    if raised is not None or "Traceback (most recent call last)" in err:
        return "traceback"
    lines = [line for line in err.splitlines() if line.strip()]
    if code == 2 and len(lines) == 1 and lines[0].startswith("abscert-bench: error: "):
        return "clean"
    if code == 0:
        return "accepted"
    return "other"


# ----------------------------------------------------------------------------------------------- setups
def _write(rel: str, data: bytes | str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data)
    return setup


def _config(**changes: object) -> Callable[[Path], None]:
    """Rewrite {tmp}/run/config.json with keys changed (a value None removes the key)."""
    def setup(tmp: Path) -> None:
        path = tmp / "run" / "config.json"
        config = json.loads(path.read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        path.write_text(json.dumps(config))
    return setup


def _verifier_json(data: str) -> Callable[[Path], None]:
    return _write("run/verify/eps=0.1,first=10/ibp.json", data)


def _result_json(transform: Callable[[dict], object] | None = None, text: str | None = None) -> Callable[[Path], None]:
    """Rewrite the store's one result.json (through transform, or as raw text)."""
    def setup(tmp: Path) -> None:
        (path,) = list((tmp / "store" / "cells").glob("*/result.json"))
        if text is not None:
            path.write_text(text)
        else:
            assert transform is not None
            path.write_text(json.dumps(transform(json.loads(path.read_text()))))
    return setup


def _drop(key: str) -> Callable[[dict], dict]:
    def transform(result: dict) -> dict:
        result.pop(key, None)
        return result
    return transform


def _set(key: str, value: object) -> Callable[[dict], dict]:
    def transform(result: dict) -> dict:
        result[key] = value
        return result
    return transform


def _spec(text: str) -> Callable[[Path], None]:
    return _write("bad.toml", text)


def _spec_with(old: str, new: str) -> Callable[[Path], None]:
    return _spec(SPEC_TEXT.replace(old, new))


def _instances(text: str) -> Callable[[Path], None]:
    return _write("bench/instances.csv", text)


def _vnnlib(text: str | bytes) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (path,) = [p for p in (tmp / "bench" / "vnnlib").glob("*.vnnlib")][:1] or [None]
        assert path is not None
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
    return setup


def _truncated_idx(tmp: Path) -> None:
    for sub in ("mnist", "fashion-mnist"):
        for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                     "t10k-labels-idx1-ubyte"):
            path = tmp / "data" / sub / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x05")  # header says 5 images, none follow


def _corrupt_cell_dir(tmp: Path) -> None:
    cells = tmp / "store" / "cells"
    (cell,) = list(cells.iterdir())
    shutil.copytree(cell, cells / "zz-corrupt")
    (cells / "zz-corrupt" / "result.json").write_text("{ not json")


def _ro_then(setup: Callable[[Path], None]) -> Callable[[Path], None]:
    return setup


# ------------------------------------------------------------------------------------------------ cases
def _cases() -> list[Case]:
    cases: list[Case] = []

    def add(id: str, argv: list[str], setup: Callable[[Path], None] | None = None, fragment: str = "") -> None:
        cases.append(Case(id, argv, setup, fragment))

    train = ["train", *FAST_TRAIN, "--out", "{tmp}/r"]
    compare = ["compare", *FAST_COMPARE, "--out", "{tmp}/c"]
    demo = ["demo", *FAST_COMPARE, "--out", "{tmp}/d"]

    # -- argv: no verb, unknown verb, unknown options, missing required arguments
    add("no-verb", [])
    add("unknown-verb", ["trian"])
    for verb in ("train", "verify", "table", "compare", "demo", "export", "recheck", "bench", "run", "run-table",
                 "slim"):
        add(f"{verb}-unknown-option", [verb, "--no-such-option"])
    add("data-no-subcommand", ["data"])
    add("data-unknown-subcommand", ["data", "fetch"])
    add("vnncomp-no-subcommand", ["vnncomp"])
    add("vnncomp-unknown-subcommand", ["vnncomp", "walk"])
    add("train-no-out", ["train", *FAST_TRAIN])
    add("verify-no-run", ["verify"])
    add("table-no-runs", ["table"])
    add("compare-no-out", ["compare", *FAST_COMPARE])
    add("export-no-out", ["export", "{run}"])
    add("recheck-one-arg", ["recheck", "{run}"])
    add("run-no-spec", ["run"])
    add("slim-no-max", ["slim", "{store}"])

    # -- argv type errors (argparse): every int/float option of every verb
    int_opts = {
        "train": ["--epochs", "--batch-size", "--seed", "--warmup-epochs", "--ramp-epochs"],
        "verify": ["--limit", "--batch-size"],
        "compare": ["--epochs", "--limit"],
        "demo": ["--limit"],
        "export": ["--samples", "--seed"],
        "bench": ["--epochs", "--batch-size", "--limit-train"],
        "run": ["--workers", "--threads"],
    }
    float_opts = {
        "train": ["--eps", "--lr", "--grad-norm", "--kappa-end", "--lr-decay", "--lr-warmup-epochs", "--budget-s",
                  "--d-step"],
        "verify": ["--eps", "--timeout", "--memory-mb"],
        "compare": ["--eps", "--lr"],
        "export": ["--timeout"],
        "bench": ["--eps"],
        "slim": ["--max-mb"],
    }
    prefix = {"train": train, "verify": ["verify", "{run}", "--verifiers", "ibp"], "compare": compare, "demo": demo,
              "export": ["export", "{run}", "--out", "{tmp}/e"], "bench": ["bench", "--model", "fc3"],
              "run": ["run", "{spec}", "--out", "{tmp}/s"], "slim": ["slim", "{store}"]}
    for verb, opts in int_opts.items():
        for opt in opts:
            add(f"{verb}{opt}-not-int", [*prefix[verb], opt, "abc"])
            add(f"{verb}{opt}-float-for-int", [*prefix[verb], opt, "1.5"])
    for verb, opts in float_opts.items():
        for opt in opts:
            add(f"{verb}{opt}-not-number", [*prefix[verb], opt, "abc"])
    add("slim-max-mb-missing-value", ["slim", "{store}", "--max-mb"])

    # -- train: out-of-range and malformed values
    for opt, value in [("--eps", "-0.1"), ("--eps", "1.5"), ("--eps", "nan"), ("--eps", "inf"), ("--d", "0"),
                       ("--d", "-0.2"), ("--d", "abc"), ("--d", ""), ("--d", ","), ("--d", "2"), ("--d", "nan"),
                       ("--d", "0.2,abc"), ("--epochs", "0"), ("--epochs", "-3"), ("--batch-size", "0"),
                       ("--batch-size", "-1"), ("--lr", "0"), ("--lr", "-1"), ("--lr", "nan"), ("--lr", "inf"),
                       ("--grad-norm", "-1"), ("--kappa-end", "2"), ("--kappa-end", "-0.5"),
                       ("--lr-schedule", "linear"), ("--lr-milestones", "abc"), ("--lr-milestones", "0"),
                       ("--lr-decay", "0"), ("--lr-decay", "2"), ("--lr-warmup-epochs", "-1"),
                       ("--lr-warmup-epochs", "5"), ("--budget-s", "-1"), ("--budget-s", "nan"),
                       ("--warmup-epochs", "-1"), ("--ramp-epochs", "-1"), ("--dataset", "imagenet21k"),
                       ("--dataset", ""), ("--model", "gpt"), ("--model", ""), ("--method", "trades"),
                       ("--method", ""), ("--activation", "gelu"), ("--variant", "blob"), ("--protocol", "magic"),
                       ("--device", "foo"), ("--device", ""), ("--device", "cuda:7"), ("--device", "cuda:x"),
                       ("--seed", "-1")]:
        add(f"train{opt}={value or 'empty'}", [*train, opt, value])
    add("train-d-near-third-above", [*train, "--method", "abscert", "--d", str(1 / 3 + 1e-9)])
    add("train-d-near-third-below", [*train, "--method", "abscert", "--d", str(1 / 3 - 1e-9)])
    add("train-recipe-with-pixel", [*train, "--recipe", "official"])
    add("train-d-with-official", [*train, "--method", "abscert", "--protocol", "official", "--d", "0.2"])
    add("train-out-is-file", ["train", *FAST_TRAIN, "--out", "{file}"])
    add("train-out-under-file", ["train", *FAST_TRAIN, "--out", "{file}/sub"])
    add("train-out-existing-run", ["train", *FAST_TRAIN, "--out", "{run}"])
    add("train-data-root-is-file", ["train", *FAST_TRAIN, "--dataset", "mnist", "--data-root", "{file}",
                                    "--out", "{tmp}/r"])
    add("train-mnist-missing", ["train", *FAST_TRAIN, "--dataset", "mnist", "--data-root", "{tmp}/nodata",
                                "--out", "{tmp}/r"])
    add("train-mnist-truncated", ["train", *FAST_TRAIN, "--dataset", "mnist", "--data-root", "{tmp}/data",
                                  "--out", "{tmp}/r"], _truncated_idx)

    # -- verify
    verify = ["verify", "{run}", "--verifiers", "ibp"]
    add("verify-missing-run", ["verify", "{tmp}/nope"])
    add("verify-run-is-file", ["verify", "{file}"])
    add("verify-empty-dir", ["verify", "{tmp}"])
    for opt, value in [("--batch-size", "0"), ("--batch-size", "-4"), ("--limit", "-5"), ("--limit", "0"),
                       ("--eps", "-0.1"), ("--eps", "2"), ("--eps", "nan"), ("--timeout", "0"), ("--timeout", "-1"),
                       ("--memory-mb", "0"), ("--memory-mb", "-5"), ("--device", "foo"), ("--device", "cuda:7"),
                       ("--device", "")]:
        add(f"verify{opt}={value or 'empty'}", [*verify, opt, value])
    for value in ["", ",", "nope", "ibp,nope", "ibp,,ibp", "ibp,ibp"]:
        add(f"verify--verifiers={value or 'empty'}", ["verify", "{run}", "--verifiers", value])
    add("verify-existing-results", ["verify", "{run}", "--verifiers", "ibp", "--limit", "10"])
    add("verify-inapplicable", ["verify", "{run}", "--verifiers", "abscert-paper", "--limit", "5"])
    add("verify-data-root-is-file", [*verify, "--data-root", "{file}", "--limit", "5"], _config(dataset="mnist"))
    for key, value in [("eps", "abc"), ("eps", [0.1]), ("eps", None), ("eps", -1), ("eps", True),
                       ("dataset", 5), ("dataset", None), ("dataset", "imagenet"), ("method", None), ("method", 7),
                       ("model", ["fc3"]), ("method_options", "d=0.2"), ("input_shape", "8x8"),
                       ("num_classes", "ten")]:
        add(f"verify-config-{key}={value!r}", [*verify, "--limit", "5"], _config(**{key: value}))
    add("verify-config-list", [*verify, "--limit", "5"], _write("run/config.json", "[1, 2, 3]"))
    add("verify-config-string", [*verify, "--limit", "5"], _write("run/config.json", '"config"'))
    add("verify-config-corrupt", [*verify, "--limit", "5"], _write("run/config.json", "{ broken"))
    add("verify-config-empty", [*verify, "--limit", "5"], _write("run/config.json", ""))
    add("verify-config-binary", [*verify, "--limit", "5"], _write("run/config.json", b"\xff\xfe\x00\x01\x80"))
    add("verify-config-dir", [*verify, "--limit", "5"], lambda tmp: ((tmp / "run" / "config.json").unlink(),
                                                                     (tmp / "run" / "config.json").mkdir()))
    add("verify-checkpoint-missing", [*verify, "--limit", "5"], lambda tmp: (tmp / "run" / "checkpoint.pt").unlink())
    add("verify-checkpoint-garbage", [*verify, "--limit", "5"], _write("run/checkpoint.pt", b"not a checkpoint"))
    add("verify-checkpoint-empty", [*verify, "--limit", "5"], _write("run/checkpoint.pt", b""))

    # -- table
    add("table-missing", ["table", "{tmp}/nope"])
    add("table-empty-dir", ["table", "{tmp}"])
    add("table-file", ["table", "{file}"])
    add("table-corrupt-verifier-json", ["table", "{run}"], _verifier_json("{ not json"))
    add("table-verifier-json-list", ["table", "{run}"], _verifier_json("[]"))
    add("table-verifier-json-missing-keys", ["table", "{run}"], _verifier_json('{"verifier": "ibp"}'))
    add("table-verifier-json-binary", ["table", "{run}"], _write("run/verify/eps=0.1,first=10/ibp.json", b"\xff\x00"))
    add("table-verifier-json-bad-types", ["table", "{run}"],
        _verifier_json('{"verifier": "ibp", "samples": "x", "verified_fraction": "y", "falsified": 0, '
                       '"unknown": 0, "time_mean_s": "z"}'))
    add("table-bad-eps-dir", ["table", "{run}"], _write("run/verify/eps=abc/ibp.json", "{}"))
    add("table-corrupt-config", ["table", "{run}"], _write("run/config.json", "{ broken"))
    add("table-config-list", ["table", "{run}"], _write("run/config.json", "[]"))
    add("table-config-no-dataset", ["table", "{run}"], _config(dataset=None))
    add("table-corrupt-metrics", ["table", "{run}"], _write("run/metrics.csv", "epoch,loss\n1,abc\n"))
    add("table-metrics-binary", ["table", "{run}"], _write("run/metrics.csv", b"\xff\xfe\x00garbage"))
    add("table-csv-is-dir", ["table", "{run}", "--csv", "{tmp}"])
    add("table-csv-under-file", ["table", "{run}", "--csv", "{file}/t.csv"])
    add("table-csv-missing-parent", ["table", "{run}", "--csv", "{tmp}/no/such/t.csv"])
    add("table-sound-stages-none", ["table", "{run}", "--sound-stages"])

    # -- compare / demo
    for name, base in (("compare", compare), ("demo", demo)):
        for opt, value in [("--methods", ""), ("--methods", ","), ("--methods", "natural,trades"),
                           ("--verifiers", ""), ("--verifiers", "nope"), ("--limit", "0"), ("--limit", "-5"),
                           ("--epochs", "0"), ("--eps", "2"), ("--kappa-end", "2"), ("--device", "foo"),
                           ("--d", ""), ("--model", "gpt")]:
            add(f"{name}{opt}={value or 'empty'}", [*base, opt, value])
        add(f"{name}-out-is-file", [name, *FAST_COMPARE, "--out", "{file}"])

    # -- data
    add("data-prepare-root-is-file", ["data", "prepare", "--root", "{file}"])
    add("data-prepare-data-root-is-file", ["data", "prepare", "--data-root", "{file}"])
    add("data-list-root-is-file", ["data", "list", "--root", "{file}"])
    add("data-prepare-truncated", ["data", "prepare", "--root", "{tmp}/data"], _truncated_idx)
    add("data-prepare-unknown-option", ["data", "prepare", "--bogus"])
    add("data-list-unknown-option", ["data", "list", "--bogus"])

    # -- export
    export = ["export", "{run}", "--out", "{tmp}/e"]
    for opt, value in [("--samples", "0"), ("--samples", "-1"), ("--samples", "100000"), ("--timeout", "0"),
                       ("--timeout", "-1"), ("--timeout", "nan"), ("--seed", "-1")]:
        add(f"export{opt}={value}", [*export, opt, value])
    add("export-missing-run", ["export", "{tmp}/nope", "--out", "{tmp}/e"])
    add("export-run-is-file", ["export", "{file}", "--out", "{tmp}/e"])
    add("export-out-is-file", ["export", "{run}", "--out", "{file}"])
    add("export-out-exists", ["export", "{run}", "--out", "{bench}"])
    add("export-config-eps-abc", export, _config(eps="abc"))
    add("export-config-list", export, _write("run/config.json", "[0.1]"))
    add("export-checkpoint-garbage", export, _write("run/checkpoint.pt", b"garbage"))

    # -- recheck
    add("recheck-missing-checkpoint", ["recheck", "{tmp}/nope.pt", "{tmp}/nope.npz"])
    add("recheck-missing-npz", ["recheck", "{run}", "{tmp}/nope.npz"])
    add("recheck-garbage-npz", ["recheck", "{run}", "{tmp}/x.npz"], _write("x.npz", b"garbage"))
    add("recheck-npz-is-dir", ["recheck", "{run}", "{tmp}"])
    add("recheck-garbage-checkpoint", ["recheck", "{tmp}/c.pt", "{tmp}/x.npz"], _write("c.pt", b"garbage"))

    # -- vnncomp run
    vnn = ["vnncomp", "run", "{bench}"]
    add("vnncomp-missing-folder", ["vnncomp", "run", "{tmp}/nope"])
    add("vnncomp-folder-is-file", ["vnncomp", "run", "{file}"])
    add("vnncomp-no-instances", ["vnncomp", "run", "{tmp}"])
    add("vnncomp-bound-method-nope", [*vnn, "--bound-method", "nope"])
    add("vnncomp-bound-method-empty", [*vnn, "--bound-method", ""])
    add("vnncomp-out-is-dir", [*vnn, "--out", "{tmp}"])
    add("vnncomp-out-under-file", [*vnn, "--out", "{file}/r.csv"])
    for label, text in [("empty", ""), ("blank-lines", "\n\n"), ("two-fields", "onnx/a.onnx,vnnlib/b.vnnlib\n"),
                        ("four-fields", "a,b,c,d\n"), ("bad-timeout", "onnx/network.onnx,{v},abc\n"),
                        ("zero-timeout", "onnx/network.onnx,{v},0\n"), ("neg-timeout", "onnx/network.onnx,{v},-1\n"),
                        ("missing-onnx", "onnx/nope.onnx,{v},10\n"),
                        ("escape-passwd", "../../../../../../../../etc/passwd,{v},10\n"),
                        ("escape-vnnlib", "onnx/network.onnx,../../../../../../etc/passwd,10\n"),
                        ("absolute-path", "/etc/passwd,{v},10\n"), ("escape-dotdot", "../notes.txt,{v},10\n"),
                        ("binary", "\udcff")]:
        def setup(tmp: Path, text: str = text) -> None:
            vnnlibs = sorted((tmp / "bench" / "vnnlib").glob("*.vnnlib"))
            onnx = sorted((tmp / "bench" / "onnx").glob("*.onnx"))
            rel_v = f"vnnlib/{vnnlibs[0].name}"
            body = text.replace("{v}", rel_v).replace("onnx/network.onnx", f"onnx/{onnx[0].name}")
            path = tmp / "bench" / "instances.csv"
            if "\udcff" in body:
                path.write_bytes(b"\xff\xfe\x00\x01binary\x00")
            else:
                path.write_text(body)
        add(f"vnncomp-instances-{label}", vnn, setup)
    add("vnncomp-instances-is-dir", vnn, lambda tmp: ((tmp / "bench" / "instances.csv").unlink(),
                                                      (tmp / "bench" / "instances.csv").mkdir()))
    for label, text in [("empty", ""), ("garbage", "(this is not vnnlib"), ("binary", b"\xff\x00\xfe"),
                        ("no-asserts", "(declare-const X_0 Real)\n"), ("unbalanced", "(assert (<= X_0 1.0)\n"),
                        ("bad-number", "(declare-const X_0 Real)\n(assert (<= X_0 abc))\n")]:
        add(f"vnncomp-vnnlib-{label}", vnn, _vnnlib(text))
    add("vnncomp-onnx-garbage", vnn, lambda tmp: [p.write_bytes(b"not onnx")
                                                  for p in (tmp / "bench" / "onnx").glob("*.onnx")])
    add("vnncomp-meta-corrupt", vnn, lambda tmp: [p.write_text("{ bad") for p in (tmp / "bench").glob("*.json")])

    # -- bench
    for opt, value in [("--epochs", "0"), ("--epochs", "-1"), ("--batch-size", "0"), ("--limit-train", "0"),
                       ("--limit-train", "-5"), ("--eps", "-1"), ("--eps", "2"), ("--device", "foo"),
                       ("--methods", "nope"), ("--methods", ","), ("--model", "gpt"), ("--dataset", "nope")]:
        add(f"bench{opt}={value}", ["bench", "--model", "fc3", "--epochs", "1", "--limit-train", "64", opt, value])

    # -- run SPEC
    run = ["run", "{tmp}/bad.toml", "--out", "{tmp}/s", "--no-report", "--quiet"]
    add("run-missing-spec", ["run", "{tmp}/nope.toml", "--out", "{tmp}/s"])
    add("run-spec-is-dir", ["run", "{tmp}", "--out", "{tmp}/s"])
    add("run-spec-binary", run, _spec(b"\xff\xfe\x00\x01\x80\x81binary"))  # type: ignore[arg-type]
    add("run-spec-not-toml", run, _spec("this is [not toml"))
    add("run-spec-empty", run, _spec(""))
    add("run-spec-verifiers-empty", run, _spec_with('verifiers = ["ibp"]', "verifiers = []"))
    add("run-spec-verifiers-unknown", run, _spec_with('verifiers = ["ibp"]', 'verifiers = ["nope"]'))
    add("run-spec-limit-zero", run, _spec_with("limit = 5", "limit = 0"))
    add("run-spec-limit-negative", run, _spec_with("limit = 5", "limit = -5"))
    add("run-spec-limit-string", run, _spec_with("limit = 5", 'limit = "5"'))
    add("run-spec-epochs-zero", run, _spec_with("epochs = 1", "epochs = 0"))
    add("run-spec-epochs-float", run, _spec_with("epochs = 1", "epochs = 1.5"))
    add("run-spec-eps-empty", run, _spec_with("eps = [0.1]", "eps = []"))
    add("run-spec-eps-out-of-range", run, _spec_with("eps = [0.1]", "eps = [2.0]"))
    add("run-spec-models-empty", run, _spec_with('models = ["fc3"]', "models = []"))
    add("run-spec-model-unknown", run, _spec_with('models = ["fc3"]', 'models = ["gpt"]'))
    add("run-spec-dataset-unknown", run, _spec_with('datasets = ["digits"]', 'datasets = ["nope"]'))
    add("run-spec-no-methods", run, _spec_with("[methods.natural]\n", ""))
    add("run-spec-method-unknown", run, _spec_with("[methods.natural]", "[methods.trades]"))
    add("run-spec-unknown-top-key", run, _spec(SPEC_TEXT + "bogus = 1\n"))
    add("run-spec-unknown-train-key", run, _spec_with("epochs = 1", "epochs = 1\nbogus = 2"))
    add("run-spec-seeds-string", run, _spec_with("seeds = [0]", 'seeds = ["a"]'))
    add("run-spec-d-near-third", run, _spec_with("[methods.natural]", f"[methods.abscert]\nd = {1 / 3 + 1e-9!r}"))
    add("run-spec-kappa-2", run, _spec_with("epochs = 1", "epochs = 1\nkappa_end = 2.0"))
    add("run-scheduler-not-address", ["run", "{spec}", "--out", "{tmp}/s", "--scheduler", "notanaddress"])
    add("run-scheduler-empty", ["run", "{spec}", "--out", "{tmp}/s", "--scheduler", ""])
    add("run-scheduler-bad-port", ["run", "{spec}", "--out", "{tmp}/s", "--scheduler", "tcp://localhost:notaport"])
    add("run-workers-zero", ["run", "{spec}", "--out", "{tmp}/s", "--workers", "0"])
    add("run-workers-negative", ["run", "{spec}", "--out", "{tmp}/s", "--workers", "-2"])
    add("run-threads-zero", ["run", "{spec}", "--out", "{tmp}/s", "--threads", "0"])
    add("run-workers-and-scheduler", ["run", "{spec}", "--out", "{tmp}/s", "--workers", "1", "--scheduler",
                                      "tcp://127.0.0.1:1"])
    add("run-out-is-file", ["run", "{spec}", "--out", "{file}"])
    add("run-out-user-dir", ["run", "{spec}", "--out", "{tmp}"])
    add("run-out-other-spec-store", ["run", "{tmp}/other.toml", "--out", "{store}"],
        _write("other.toml", SPEC_TEXT.replace('name = "tiny"', 'name = "other"').replace("limit = 5", "limit = 6")))
    add("run-data-root-is-file", ["run", "{spec}", "--out", "{tmp}/s", "--data-root", "{file}"],
        _write("tiny.toml", SPEC_TEXT.replace('"digits"', '"mnist"')))

    # -- run-table
    add("run-table-missing", ["run-table", "{tmp}/nope"])
    add("run-table-empty-dir", ["run-table", "{tmp}"])
    add("run-table-file", ["run-table", "{file}"])
    add("run-table-result-corrupt", ["run-table", "{store}"], _result_json(text="{ not json"))
    add("run-table-result-list", ["run-table", "{store}"], _result_json(text="[]"))
    add("run-table-result-binary", ["run-table", "{store}"], _result_json(text="\x00\x01"))
    add("run-table-result-no-cell", ["run-table", "{store}"], _result_json(_drop("cell")))
    add("run-table-result-cell-string", ["run-table", "{store}"], _result_json(_set("cell", "x")))
    add("run-table-result-bad-status", ["run-table", "{store}"], _result_json(_set("status", "weird")))
    add("run-table-result-stages-list", ["run-table", "{store}"], _result_json(_set("stages", [1, 2])))
    add("run-table-result-wrong-id", ["run-table", "{store}"], _result_json(_set("id", "other")))
    add("run-table-corrupt-extra-cell", ["run-table", "{store}"], _corrupt_cell_dir)
    add("run-table-suite-json-corrupt", ["run-table", "{store}"], _write("store/suite.json", "{ bad"))
    add("run-table-latex-is-dir", ["run-table", "{store}", "--latex", "{tmp}"])
    add("run-table-markdown-is-dir", ["run-table", "{store}", "--markdown", "{tmp}"])
    add("run-table-latex-under-file", ["run-table", "{store}", "--latex", "{file}/t.tex"])
    add("run-table-plots-is-file", ["run-table", "{store}", "--plots", "{file}"])
    add("run-table-scalability-not-store", ["run-table", "{run}", "--scalability"])
    add("run-table-scalability-markdown-dir", ["run-table", "{store}", "--scalability", "--markdown", "{tmp}"])

    # -- slim
    add("slim-negative", ["slim", "{store}", "--max-mb", "-1"])
    add("slim-nan", ["slim", "{store}", "--max-mb", "nan"])
    add("slim-missing-store", ["slim", "{tmp}/nope", "--max-mb", "1"])
    add("slim-not-a-store", ["slim", "{tmp}", "--max-mb", "1"])
    add("slim-file", ["slim", "{file}", "--max-mb", "1"])

    # -- --quiet is accepted everywhere but does not make bad input good
    add("train-quiet-bad-eps", [*train, "--quiet", "--eps", "5"])
    add("verify-quiet-bad-limit", [*verify, "--quiet", "--limit", "-1"])
    return cases


def _check_ok(*fragments: str) -> Callable[[Path, int, str, str], None]:
    def check(tmp: Path, code: int, out: str, err: str) -> None:
        assert code == 0, err
        assert "Traceback" not in err
        assert not [line for line in err.splitlines() if "Warning" in line], err
        for fragment in fragments:
            assert fragment in out, out
    return check


def _check_files(*rels: str, absent: Sequence[str] = ()) -> Callable[[Path, int, str, str], None]:
    def check(tmp: Path, code: int, out: str, err: str) -> None:
        assert code == 0, err
        for rel in rels:
            assert (tmp / rel).exists(), rel
        for rel in absent:
            assert not (tmp / rel).exists(), rel
    return check


def _accepted() -> list[Accepted]:
    return [
        Accepted("train-d-exact-third", ["train", *FAST_TRAIN, "--method", "abscert", "--d", str(1 / 3),
                                         "--out", "{tmp}/r"], _check_ok("trained abscert"),
                 notes="1/3 in float64 is 1/K up to rounding: accepted"),
        Accepted("train-kappa-end-1", ["train", *FAST_TRAIN, "--kappa-end", "1", "--out", "{tmp}/r"],
                 _check_ok("trained")),
        Accepted("train-quiet", ["train", *FAST_TRAIN, "--quiet", "--out", "{tmp}/r"],
                 _check_files("r/checkpoint.pt")),
        Accepted("verify-limit-1", ["verify", "{run}", "--verifiers", "ibp", "--limit", "1"],
                 _check_files("run/verify/eps=0.1,first=1/ibp.json")),
        Accepted("verify-limit-beyond", ["verify", "{run}", "--verifiers", "ibp", "--limit", "100000"],
                 _check_files("run/verify/eps=0.1/ibp.json"),
                 notes="a limit beyond the test split means the whole split (the folder says so: eps=E/)"),
        Accepted("verify-eps-zero", ["verify", "{run}", "--verifiers", "ibp", "--limit", "3", "--eps", "0"],
                 _check_files("run/verify/eps=0,first=3/ibp.json")),
        Accepted("verify-verifiers-trailing-comma", ["verify", "{run}", "--verifiers", "ibp,", "--limit", "2"],
                 _check_files("run/verify/eps=0.1,first=2/ibp.json"), notes="empty names after a comma are dropped"),
        Accepted("table-run", ["table", "{run}"], _check_ok("IBP")),
        Accepted("table-csv", ["table", "{run}", "--csv", "{tmp}/t.csv"], _check_files("t.csv", absent=["t.csv.tmp"])),
        Accepted("data-list-data-root", ["data", "list", "--data-root", "{tmp}"], _check_ok("digits")),
        Accepted("data-list-root-alias", ["data", "list", "--root", "{tmp}"], _check_ok("digits")),
        Accepted("run-table-store", ["run-table", "{store}"], _check_ok("natural")),
        Accepted("run-table-latex", ["run-table", "{store}", "--latex", "{tmp}/t.tex"], _check_files("t.tex")),
        Accepted("slim-zero", ["slim", "{store}", "--max-mb", "1000"], _check_ok("took 0 checkpoint")),
        Accepted("run-complete-store", ["run", "{spec}", "--out", "{store}", "--no-report", "--quiet"],
                 _check_ok("1 already complete, 0 run now")),
    ]


CASES: list[Case] = _cases()
ACCEPTED: list[Accepted] = _accepted()
