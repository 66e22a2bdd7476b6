"""Crosscheck an exported digits folder with external tools: Marabou (maraboupy 2.0.0) must load every standard
and hull ONNX and, where it decides an instance, agree with `vnncomp run`; onnx2pytorch must load every ONNX
(deployed and network.onnx included) and match onnxruntime.

Run with `make crosscheck`; the table of results goes to $CROSSCHECK_REPORT (default build/crosscheck.md).
"""
import csv
import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from abscert_bench.training.loop import TrainConfig, run_training
from abscert_bench.vnncomp import export_benchmark, read_vnnlib, run_benchmark
from abscert_bench.vnncomp.onnx_export import onnxruntime_outputs

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 0.1
SAMPLES = 3
TIMEOUT = 60.0
ROOT = Path(__file__).resolve().parents[2]
# the committed folders are crosschecked too: source → glob of their instances.csv under the repository
COMMITTED = {"results/vnncomp": "results/vnncomp/*/instances.csv",
             "results/quick": "results/quick/cells/*/vnncomp/instances.csv"}
COMMITTED_MARABOU_S = {"results/vnncomp": 15.0}  # Marabou's time cap per MNIST instance: loading and agreement count
# name → (training method, method options): a standard (IBP-trained) network, AbsCert with d dividing 1 (upper
# ends folded into the first layer) and with d not dividing 1 (the Relu form), the region variant
RUNS = {
    "ibp": ("ibp", None),
    "abscert-d0.2": ("abscert", {"d": 0.2, "variant": "point"}),
    "abscert-d0.3": ("abscert", {"d": 0.3, "variant": "point"}),
    "abscert-region": ("abscert", {"d": 0.25, "variant": "region"}),
}
RESULTS: dict[str, list[dict]] = {"marabou": [], "onnx2pytorch": []}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, digits):
    """Exported folders (and our run-back's rows), one per run."""
    root = tmp_path_factory.mktemp("crosscheck")
    out = {}
    for name, (method, options) in RUNS.items():
        run_dir = root / "runs" / name
        run_dir.mkdir(parents=True)
        config = TrainConfig("digits", "fc3", method, EPS, epochs=3, warmup_epochs=0, ramp_epochs=1,
                             method_options=options or {})
        run_training(config, digits, run_dir)
        folder = root / "bench" / name
        export_benchmark(run_dir, folder, samples=SAMPLES, seed=0, timeout=TIMEOUT)
        rows = run_benchmark(folder, use_sound_verifier=True)
        out[name] = (folder, {(r["onnx_file"], r["vnnlib_file"]): r for r in rows})
    # the committed folders, with the run-back results committed beside them (read, never rewritten here)
    for pattern in COMMITTED.values():
        for csv_path in sorted(ROOT.glob(pattern)):
            with (csv_path.parent / "results.csv").open(newline="") as handle:
                rows = {(r["onnx_file"], r["vnnlib_file"]): r for r in csv.DictReader(handle)}
            out[csv_path.parent.relative_to(ROOT).as_posix()] = (csv_path.parent, rows)
    return out


def _instances(folder):
    for line in (folder / "instances.csv").read_text().splitlines():
        onnx_rel, vnn_rel, timeout = line.split(",")
        yield onnx_rel, vnn_rel, float(timeout)


def _source(name):
    """Where a folder came from: a key of COMMITTED, or "digits" for the folders this module exports."""
    return next((source for source in COMMITTED if name.startswith(source + "/")), "digits")


def _encoding(onnx_rel):
    stem = Path(onnx_rel).stem
    return {"model": "standard", "hull": "hull", "deployed": "deployed"}.get(stem, stem)


def _marabou_solve(onnx_path, vnn_path, timeout):
    """(loaded, verdict, witness x or None, error text)."""
    from maraboupy import Marabou

    try:
        network = Marabou.read_onnx(str(onnx_path))
    except Exception as exc:  # the parser refuses an op
        return False, "not loaded", None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    options = Marabou.createOptions(timeoutInSeconds=int(timeout), verbosity=0)
    verdict, values, _ = network.solve(verbose=False, options=options, propertyFilename=str(vnn_path))
    witness = None
    if verdict == "sat":
        witness = np.array([values[v] for v in np.asarray(network.inputVars[0]).reshape(-1)])
    return True, verdict, witness, ""


def _marabou_reads(onnx_path):
    """(whether Marabou's ONNX parser reads the file, its error's first line)."""
    from maraboupy import Marabou

    try:
        Marabou.read_onnx(str(onnx_path))
        return True, ""
    except Exception as exc:
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__


def test_marabou_loads_and_agrees(folders):
    records = RESULTS["marabou"]
    for name, (folder, ours) in folders.items():
        for onnx_rel, vnn_rel, timeout in _instances(folder):
            encoding = _encoding(onnx_rel)
            row = ours[(onnx_rel, vnn_rel)]
            if encoding == "deployed":  # Floor: Marabou has no such op (the README says so); only its parser's answer
                loaded, error = _marabou_reads(folder / onnx_rel)
                records.append({"folder": name, "encoding": encoding, "vnnlib": vnn_rel, "loaded": loaded,
                                "marabou": "not solved (Floor)", "witness_confirmed": None, "ours": row["result"],
                                "seconds": 0.0, "error": error})
                continue
            start = time.perf_counter()
            timeout = min(timeout, COMMITTED_MARABOU_S.get(_source(name), timeout))
            loaded, verdict, witness, error = _marabou_solve(folder / onnx_rel, folder / vnn_rel, timeout)
            elapsed = time.perf_counter() - start
            confirmed = None
            if witness is not None:
                prop = read_vnnlib(folder / vnn_rel)
                x = np.clip(witness, prop.lower, prop.upper).astype(np.float32)
                inside = bool(np.all(np.abs(x - witness) <= 1e-6))
                shape = tuple(d.dim_value for d in onnx.load(str(folder / onnx_rel)).graph.input[0].type.tensor_type
                              .shape.dim)
                y = onnxruntime_outputs(folder / onnx_rel, x.reshape(shape))
                confirmed = inside and prop.output_holds(y)
            records.append({"folder": name, "encoding": encoding, "vnnlib": vnn_rel, "loaded": loaded,
                            "marabou": verdict, "witness_confirmed": confirmed, "ours": row["result"],
                            "seconds": round(elapsed, 2), "error": error})
    _write_report()
    not_loaded = [r for r in records if not r["loaded"] and r["encoding"] != "deployed"]
    assert not not_loaded, not_loaded
    disagree = [r for r in records if (r["marabou"] == "unsat" and r["ours"] == "sat")
                or (r["marabou"] == "sat" and r["witness_confirmed"] and r["ours"] == "unsat")]
    assert not disagree, disagree


def _box_points(prop, shape, count=6, seed=0):
    rng = np.random.default_rng(seed)
    lower, upper = prop.lower.astype(np.float32), prop.upper.astype(np.float32)
    points = [lower, upper] + [lower + rng.random(lower.shape).astype(np.float32) * (upper - lower)
                               for _ in range(count)]
    return np.stack(points).reshape(-1, *shape[1:]).astype(np.float32)


def test_onnx2pytorch_loads_every_onnx_and_matches_onnxruntime(folders):
    from onnx2pytorch import ConvertModel

    records = RESULTS["onnx2pytorch"]
    for name, (folder, _) in folders.items():
        by_onnx: dict[str, list[str]] = {}
        for onnx_rel, vnn_rel, _ in _instances(folder):
            by_onnx.setdefault(onnx_rel, []).append(vnn_rel)
        if (folder / "onnx" / "network.onnx").exists():
            by_onnx.setdefault("onnx/network.onnx", [])
        for onnx_rel, vnn_rels in by_onnx.items():
            model = onnx.load(str(folder / onnx_rel))
            shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)
            if vnn_rels:
                points = np.concatenate([_box_points(read_vnnlib(folder / v), shape, seed=i)
                                         for i, v in enumerate(vnn_rels)])
            else:
                points = np.random.default_rng(1).random((8, *shape[1:])).astype(np.float32)
            try:
                converted = ConvertModel(model).eval()
                loaded, error = True, ""
            except Exception as exc:
                loaded, error = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            diff = None
            if loaded:
                with torch.no_grad():
                    got = np.concatenate([converted(torch.from_numpy(points[i:i + 1])).numpy()
                                          for i in range(len(points))])
                diff = float(np.max(np.abs(got - onnxruntime_outputs(folder / onnx_rel, points))))
            records.append({"folder": name, "onnx": onnx_rel, "encoding": _encoding(onnx_rel), "loaded": loaded,
                            "points": int(len(points)), "max_abs_diff": diff, "error": error})
    _write_report()
    assert all(r["loaded"] for r in records), [r for r in records if not r["loaded"]]
    assert all(r["max_abs_diff"] <= 1e-4 for r in records), records


def _write_report():
    path = Path(os.environ.get("CROSSCHECK_REPORT", "build/crosscheck.md"))
    path.parent.mkdir(parents=True, exist_ok=True)
    mar, o2p = RESULTS["marabou"], RESULTS["onnx2pytorch"]
    lines = ["# Crosscheck (tests/crosscheck): Marabou and onnx2pytorch on exported folders", "",
             f"digits: folders {', '.join(RUNS)} made by the test ({SAMPLES} images each, eps {EPS}, timeout "
             f"{TIMEOUT:g} s); results/vnncomp: the committed MNIST folders (Marabou gets at most "
             f"{COMMITTED_MARABOU_S['results/vnncomp']:g} s per instance there); results/quick: the exported folders "
             "of the committed quick store's cells (digits, each instance's own timeout).", "",
             "| data | encoding | instances | loaded in Marabou | decided by Marabou | agreeing with vnncomp run "
             "| both decided | ONNX files | loaded in onnx2pytorch | max abs diff to onnxruntime |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for source in ("digits", *COMMITTED):
        def mine(r, source=source):
            return _source(r["folder"]) == source

        for encoding in ("standard", "hull", "deployed", "network"):
            m = [r for r in mar if r["encoding"] == encoding and mine(r)]
            o = [r for r in o2p if r["encoding"] == encoding and mine(r)]
            if not m and not o:
                continue
            decided = [r for r in m if r["marabou"] in ("unsat", "sat")]
            both = [r for r in decided if r["ours"] in ("sat", "unsat")]
            agree = [r for r in both if r["ours"] == r["marabou"]]
            diffs = [r["max_abs_diff"] for r in o if r["max_abs_diff"] is not None]
            instances = len(m) if m else "-"
            marabou = (f"{sum(bool(r['loaded']) for r in m)}", f"{len(decided)}", f"{len(agree)} of {len(both)}") \
                if m else ("-",) * 3
            if encoding == "deployed" and m:  # Floor: not solved, only read
                marabou = (marabou[0], "not solved (Floor)", "-")
            lines.append(f"| {source} | {encoding} | {instances} | {' | '.join(marabou)} | {len(both) if m else '-'} | "
                         f"{len(o)} | {sum(r['loaded'] for r in o)} | {max(diffs) if diffs else '-'} |")
    lines += ["", "## Marabou, per instance", "", "| folder | encoding | vnnlib | Marabou | witness confirmed | ours "
              "| s | error |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['folder']} | {r['encoding']} | {r['vnnlib']} | {r['marabou']} | {r['witness_confirmed']} | "
              f"{r['ours']} | {r['seconds']} | {r['error']} |" for r in mar]
    lines += ["", "## onnx2pytorch, per ONNX file", "", "| folder | onnx | loaded | points | max abs diff | error |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['folder']} | {r['onnx']} | {r['loaded']} | {r['points']} | {r['max_abs_diff']} | {r['error']} |"
              for r in o2p]
    path.write_text("\n".join(lines) + "\n")
