"""The comparison harness: spec validation, grid expansion, resumable store, Dask, tables, plots, new models."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from abscert_bench.errors import UserError
from abscert_bench.harness import Store, load_spec, parse_spec, run_suite
from abscert_bench.harness import execute as harness_execute
from abscert_bench.harness.cli import main as harness_main
from abscert_bench.harness.plots import plot_accuracy_vs_granularity, plot_error_vs_eps, plot_time_vs_parameters
from abscert_bench.harness.tables import comparisons, load_rows, scalability_rows, to_latex, to_markdown
from abscert_bench.harness.watchdog import StageGuard

ROOT = Path(__file__).resolve().parents[1]

TINY = """
name = "tiny"
[grid]
datasets = ["digits"]
models = ["fc3"]
eps = [0.1]
[train]
epochs = 1
warmup_epochs = 0
ramp_epochs = 1
[methods.natural]
[methods.abscert]
d = [0.2, 0.25]
[methods.ibp]
[verify]
verifiers = ["abscert-paper", "abscert-sound", "ibp", "crown"]
limit = 10
timeout = 2.0
"""

# Cells that cost almost nothing: natural FC3, one epoch on 300 images, IBP on 5 samples.
CHEAP = """
name = "cheap"
[grid]
datasets = ["digits"]
models = ["fc3"]
eps = [0.05, 0.1, 0.2]
[train]
epochs = 1
limit = 300
[methods.natural]
[verify]
verifiers = ["ibp"]
limit = 5
"""


@pytest.fixture(autouse=True, scope="module")
def keep_torch_threads():
    """Cells here run with one torch thread (fast on a busy machine); give the session its setting back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(spec, out, **kwargs):
    """run_suite, quietly, one torch thread per cell."""
    return run_suite(spec, out, progress=False, torch_threads=1, **kwargs)


def write_spec(tmp_path, text, name="spec.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def cell_dirs(store):
    return sorted(p.name for p in (Path(store) / "cells").iterdir())


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """The TINY suite run once in-process."""
    root = tmp_path_factory.mktemp("suite")
    spec = load_spec(write_spec(root, TINY))
    report = run(spec, root / "store")
    return spec, root / "store", report


# -- spec validation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("old, new, key, fragment", [
    ('models = ["fc3"]', 'models = ["fc9"]', "grid.models[0]", "unknown model 'fc9'"),
    ('datasets = ["digits"]', 'datasets = ["digitz"]', "grid.datasets[0]", "unknown dataset"),
    ("[methods.ibp]", "[methods.ibpp]", "methods.ibpp", "unknown training method"),
    ('"crown"]', '"crown", "deepz"]', "verify.verifiers[4]", "unknown verifier"),
    ('models = ["fc3"]', "models = []", "grid.models", "empty"),
    ("eps = [0.1]", "eps = [1.5]", "grid.eps[0]", "out of range"),
    ("eps = [0.1]", "eps = [0.1, 0.1]", "grid.eps[1]", "duplicate"),
    ("[methods.ibp]", '[methods.ibp]\n[methods.ibp2]\nmethod = "ibp"', "methods.ibp2", "duplicate cell"),
    ("d = [0.2, 0.25]", "d = [0.1]", "methods.abscert.d", "d >= 2*eps"),
    ("epochs = 1", "epochs = 0", "train.epochs", "out of range"),
    ("epochs = 1", "epoch = 1", "train.epoch", "unknown key"),
    ("[methods.natural]", "[methods.natural]\nwidth = 3", "methods.natural.width", "unknown option"),
    ("limit = 10", "limit = -1", "verify.limit", "out of range"),
    ("timeout = 2.0", "timeout = 2.0\n[verify.options.crown]\nlimit = 0", "verify.options.crown.limit",
     "out of range"),
    ("timeout = 2.0", "timeout = 2.0\ncascade = true\n[verify.options.crown]\nlimit = 3",
     "verify.options.crown.limit", "cascade = false"),
    ("timeout = 2.0", "timeout = 2.0\n[limits]\nverify_time_cap_s = -1", "limits.verify_time_cap_s",
     "out of range"),
    ("timeout = 2.0", "timeout = 2.0\n[export]\nrun_back = 1", "export.run_back", "true or false"),
])
def test_spec_errors_name_file_and_key(tmp_path, old, new, key, fragment):
    assert old in TINY
    path = write_spec(tmp_path, TINY.replace(old, new, 1), "bad.toml")
    with pytest.raises(UserError) as info:
        load_spec(path)
    message = str(info.value)
    assert str(path) in message and key in message and fragment in message, message
    assert "\n" not in message


def test_spec_file_errors(tmp_path):
    with pytest.raises(UserError, match="no such spec file"):
        load_spec(tmp_path / "missing.toml")
    with pytest.raises(UserError, match="not valid TOML"):
        load_spec(write_spec(tmp_path, "[grid\n"))


def test_grid_expansion_and_sweep():
    spec = parse_spec({
        "grid": {"datasets": ["digits"], "models": ["fc3", "dm_small"], "eps": [0.1, 0.2], "seeds": [0, 1]},
        "methods": {"ibp": {}, "abscert": {"d": [0.2, 0.4], "sweep": ["d"]},
                    "abscert-search": {"method": "abscert", "d": [0.2, 0.4], "variant": "region"}},
    }, "inline.toml")
    ids = [c.id for c in spec.cells]
    assert len(ids) == len(set(ids))
    # per (model, seed): eps 0.1 → ibp, abscert d=0.2, abscert d=0.4, search; eps 0.2 → the same without d=0.2
    assert len(ids) == 2 * 2 * (4 + 3)
    assert "digits_fc3_eps0.1_abscert_d0.2_s1" in ids and "digits_fc3_eps0.2_abscert_d0.2_s0" not in ids
    search = [c for c in spec.cells if c["entry"] == "abscert-search"]
    assert {json.dumps(c["method_options"]["d"]) for c in search} == {"[0.2, 0.4]", "0.4"}  # filtered at eps 0.2
    assert all(c["method"] == "abscert" and c["method_options"]["variant"] == "region" for c in search)
    assert spec.fingerprint() == parse_spec({
        "grid": {"datasets": ["digits"], "models": ["fc3", "dm_small"], "eps": [0.1, 0.2], "seeds": [0, 1]},
        "methods": {"ibp": {}, "abscert": {"d": [0.2, 0.4], "sweep": ["d"]},
                    "abscert-search": {"method": "abscert", "d": [0.2, 0.4], "variant": "region"}},
    }, "other.toml").fingerprint()


def test_shipped_specs_are_valid():
    specs = {path.stem: load_spec(path) for path in sorted((ROOT / "specs").glob("*.toml"))}
    assert {"quick", "mnist", "mnist-official", "mnist-budget", "mnist-paper", "mnist-gpu", "fashion-mnist",
            "fashion-mnist-paper", "cifar10", "scalability"} <= set(specs)
    assert all(len(spec.cells) > 0 for spec in specs.values())
    # the fashion-mnist CPU-budget spec runs the paper grid: same cells, smaller budget
    cpu, paper = specs["fashion-mnist"], specs["fashion-mnist-paper"]
    assert {(c["model"], c["eps"], c["label"]) for c in cpu.cells} == \
        {(c["model"], c["eps"], c["label"]) for c in paper.cells}
    # mnist is the paper-scale grid's FC3 / DM_Small part, with the same methods and recipes
    mnist, mnist_paper = specs["mnist"], specs["mnist-paper"]
    assert {c["model"] for c in mnist.cells} == {"fc3", "dm_small"}
    assert {c["eps"] for c in mnist.cells} == {0.1, 0.2, 0.3}
    paper_cells = {(c["model"], c["eps"], c["label"]): c for c in mnist_paper.cells}
    for cell in mnist.cells:
        twin = paper_cells[(cell["model"], cell["eps"], cell["label"])]
        assert twin["method_options"] == cell["method_options"] and twin["train"] == cell["train"]
    labels = {c["label"] for c in mnist.cells}
    assert {"natural", "abscert", "abscert-official", "ibp", "crown-ibp"} == labels
    official = specs["mnist-official"]  # the paper's eps 0.1 = pixel 0.05, official beside clean selection
    assert {(c["eps"], c["method_options"]["protocol"]) for c in official.cells} == {(0.05, "official"),
                                                                                    (0.05, "clean")}
    # the GPU spec: the full paper grid on cuda, every method, every test image
    gpu = specs["mnist-gpu"]
    assert {c["model"] for c in gpu.cells} == {"fc3", "dm_small", "dm_medium", "dm_large", "cnn7"}
    assert {c["eps"] for c in gpu.cells} == {0.1, 0.2, 0.3}
    assert {c["label"] for c in gpu.cells} == {"natural", "abscert-official", "abscert-clean", "ibp", "crown-ibp"}
    assert all(c["train"]["device"] == "cuda" and c["verify"]["limit"] >= 2004 for c in gpu.cells)
    assert all("abscert-sound" not in c["verify"]["options"] for c in gpu.cells)  # sound on all test images
    # the baselines follow the Shi et al. recipe constant
    from abscert_bench.training.recipes import SHI2021_MNIST
    for spec in (mnist, mnist_paper, gpu):
        for cell in spec.cells:
            if cell["label"] in ("ibp", "crown-ibp"):
                assert {k: cell["train"][k] for k in SHI2021_MNIST} == SHI2021_MNIST


# -- running and resuming -------------------------------------------------------------------------------------------
def test_suite_completes(tiny_store):
    spec, store, report = tiny_store
    assert cell_dirs(store) == sorted(c.id for c in spec.cells)
    assert report.count("done") == 3, report.summary()
    result = json.loads((store / "cells" / "digits_fc3_eps0.1_abscert_s0" / "result.json").read_text())
    assert result["stages"]["train"]["s_per_epoch"] > 0 and result["parameters"] > 0
    assert {"verify:abscert-paper", "verify:abscert-sound"} <= set(result["stages"])
    assert (store / "cells" / "digits_fc3_eps0.1_abscert_s0" / "run" / "granularity_search.csv").exists()
    assert (store / "logs" / "digits_fc3_eps0.1_ibp_s0.log").read_text().count("status done") == 1
    assert not list((store / ".staging").iterdir())


@pytest.mark.parametrize("run_back", [True, False])
def test_exported_cells_carry_their_run_back(tmp_path, run_back):
    """[export] writes cells/<id>/vnncomp/; with run_back (the default) `vnncomp run`'s results.csv lies beside it,
    one row per instance, and the stage records the verdict counts."""
    text = CHEAP.replace("eps = [0.05, 0.1, 0.2]", "eps = [0.1]") + "[export]\nsamples = 2\ntimeout = 20.0\n"
    if not run_back:
        text += "run_back = false\n"
    spec = load_spec(write_spec(tmp_path, text))
    report = run(spec, tmp_path / "store")
    assert report.count("done") == 1, report.summary()
    cell = tmp_path / "store" / "cells" / spec.cells[0].id
    folder = cell / "vnncomp"
    instances = (folder / "instances.csv").read_text().splitlines()
    assert len(instances) == 2
    stage = json.loads((cell / "result.json").read_text())["stages"]["export"]
    if not run_back:
        assert not (folder / "results.csv").exists() and "results" not in stage
        return
    import csv
    with (folder / "results.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["onnx_file"], r["vnnlib_file"]) for r in rows] == [tuple(i.split(",")[:2]) for i in instances]
    assert sum(stage["results"].values()) == 2 and set(stage["results"]) <= {"sat", "unsat", "unknown", "timeout"}
    for row in rows:  # every result file it names is inside the folder and says the same verdict
        assert (folder / row["result_file"]).read_text().splitlines()[0] == row["result"]


def test_rerun_skips_complete_and_repairs_partial(tiny_store, tmp_path):
    spec, store, _ = tiny_store
    copy = tmp_path / "store"
    subprocess.run(["cp", "-a", str(store), str(copy)], check=True)
    natural = copy / "cells" / "digits_fc3_eps0.1_natural_s0"
    (natural / "result.json").unlink()  # a cell killed before its result was written
    (copy / "cells" / "digits_fc3_eps0.1_ibp_s0" / "result.json").write_text("{\"id\": ")  # a torn file
    (copy / ".staging" / "digits_fc3_eps0.1_abscert_s0.deadbeef" / "run").mkdir(parents=True)  # kill -9 debris
    report = run(spec, copy)
    assert sorted(report.ran) == ["digits_fc3_eps0.1_ibp_s0", "digits_fc3_eps0.1_natural_s0"]
    assert report.already == ["digits_fc3_eps0.1_abscert_s0"] and len(report.debris) == 1
    assert cell_dirs(copy) == sorted(c.id for c in spec.cells)
    assert all(Store(copy).is_complete(c.id) for c in spec.cells)
    assert not list((copy / ".staging").iterdir())
    again = run(spec, copy)
    assert not again.ran and len(again.already) == 3


def test_sigkill_mid_run_then_rerun(tmp_path):
    spec_path = write_spec(tmp_path, CHEAP.replace("limit = 300", "limit = 0").replace("epochs = 1", "epochs = 3"))
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "abscert_bench.harness", "run", str(spec_path), "--out",
                             str(store), "--quiet", "--no-report", "--threads", "1"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300  # generous: a loaded machine takes long for the first cell
    try:
        while time.time() < deadline and proc.poll() is None:
            committed = list((store / "cells").glob("*/result.json")) if (store / "cells").exists() else []
            if committed:
                break  # the first cell is committed, the second has just started: kill now
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    spec = load_spec(spec_path)
    before = set(cell_dirs(store))
    assert proc.returncode == -signal.SIGKILL and 1 <= len(before) < len(spec.cells), before
    report = run(spec, store)
    assert set(report.already) == before and not before & set(report.ran)
    assert cell_dirs(store) == sorted(c.id for c in spec.cells)
    assert all(Store(store).result(c.id)["status"] == "done" for c in spec.cells)
    assert not list((store / ".staging").iterdir())


def test_natural_training_is_shared_across_eps(tmp_path):
    from abscert_bench.harness.spec import training_key

    spec = load_spec(write_spec(tmp_path, CHEAP.replace("[methods.natural]", "[methods.natural]\n[methods.ibp]")))
    keys = {c.id: training_key(c.id, c.params)[0] for c in spec.cells}
    assert {keys[c.id] for c in spec.cells if c["method"] == "natural"} == {"digits_fc3_epsany_natural_s0"}
    assert all(keys[c.id] == c.id for c in spec.cells if c["method"] == "ibp")  # IBP's training depends on eps
    store = tmp_path / "store"
    run(spec, store)
    results = {c.id: Store(store).result(c.id) for c in spec.cells}
    natural = [results[c.id] for c in spec.cells if c["method"] == "natural"]
    assert [bool(r["stages"]["train"].get("reused")) for r in natural] == [False, True, True]
    assert len({(store / "cells" / r["id"] / "run" / "metrics.csv").read_text() for r in natural}) == 1
    assert not any(r["stages"]["train"].get("reused") for r in results.values() if r["cell"]["method"] == "ibp")
    eps_verified = {json.loads(p.read_text())["eps"] for p in store.glob("cells/*natural*/run/verify/*/ibp.json")}
    assert eps_verified == {0.05, 0.1, 0.2}  # each cell verifies the shared model at its own eps
    assert not (store / "partial").exists() or not list((store / "partial").iterdir())  # dropped at the end


def test_sigkill_during_verification_keeps_the_training(tmp_path):
    """A cell killed after training (here: inside a slow verifier) trains no more on the rerun."""
    text = CHEAP.replace("eps = [0.05, 0.1, 0.2]", "eps = [0.1]").replace('verifiers = ["ibp"]',
                                                                          'verifiers = ["ibp", "alpha-crown"]') \
        .replace("limit = 5", "limit = 200")
    spec_path = write_spec(tmp_path, text)
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "abscert_bench.harness", "run", str(spec_path), "--out",
                             str(store), "--quiet", "--no-report", "--threads", "1"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cell_id = "digits_fc3_eps0.1_natural_s0"
    saved = store / "partial" / "digits_fc3_epsany_natural_s0"  # natural training is saved under an eps-free key
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if (saved / "train.json").exists():
                break  # training is saved, verification has begun: kill now
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (saved / "run" / "checkpoint.pt").exists() and not (store / "cells" / cell_id).exists()
    trained = (saved / "run" / "metrics.csv").read_text()
    report = run(load_spec(spec_path), store)
    result = Store(store).result(cell_id)
    assert report.count("done") == 1 and result["stages"]["train"]["reused"] is True
    assert (store / "cells" / cell_id / "run" / "metrics.csv").read_text() == trained  # the same model, not retrained
    assert "reusing the training" in (store / "logs" / f"{cell_id}.log").read_text()
    assert not saved.exists()  # dropped once every cell using it is committed


def test_slim_store_keeps_cells_complete(tmp_path, capsys):
    spec = load_spec(write_spec(tmp_path, CHEAP))
    store = tmp_path / "store"
    run(spec, store)
    rows_before = to_markdown(load_rows(store))
    assert harness_main(["slim", str(store), "--max-mb", "0"]) == 0
    assert "took 3 checkpoint(s) out" in capsys.readouterr().out
    assert not list(store.glob("cells/*/run/checkpoint.pt"))
    stub = json.loads(next(store.glob("cells/*/run/checkpoint.pt.omitted.json")).read_text())
    assert stub["bytes"] > 0 and len(stub["sha256"]) == 64
    assert all(Store(store).is_complete(c.id) for c in spec.cells)
    assert to_markdown(load_rows(store)) == rows_before
    assert run(spec, store).already == [c.id for c in spec.cells]  # nothing retrained
    with pytest.raises(UserError, match="left out of this results store"):
        from abscert_bench.trained import load_checkpoint

        load_checkpoint(store / "cells" / spec.cells[0].id / "run")
    assert harness_main(["slim", str(tmp_path / "nothing"), "--max-mb", "1"]) == 2
    assert "no such results store" in capsys.readouterr().err


def test_failed_cell_recorded_others_complete(tmp_path, monkeypatch):
    spec = load_spec(write_spec(tmp_path, CHEAP))
    original = harness_execute.verify_stages

    def explode(params, *args, **kwargs):
        if params["eps"] == 0.1:
            raise RuntimeError("boom in verification")
        return original(params, *args, **kwargs)

    monkeypatch.setattr(harness_execute, "verify_stages", explode)
    report = run(spec, tmp_path / "store")
    assert report.count("failed") == 1 and report.count("done") == 2
    failed = Store(tmp_path / "store").result("digits_fc3_eps0.1_natural_s0")
    assert failed["status"] == "failed" and "boom in verification" in failed["error"]
    assert "Traceback" in failed["traceback"] and "explode" in failed["traceback"]
    assert "boom in verification" in (tmp_path / "store" / "logs" / "digits_fc3_eps0.1_natural_s0.log").read_text()
    assert "failed: digits_fc3_eps0.1_natural_s0" in report.summary()
    monkeypatch.setattr(harness_execute, "verify_stages", original)
    retry = run(spec, tmp_path / "store")
    assert list(retry.ran) == ["digits_fc3_eps0.1_natural_s0"] and retry.count("done") == 1


def test_incompatible_store_refused_without_force(tmp_path, capsys):
    store = tmp_path / "store"
    one = CHEAP.replace("eps = [0.05, 0.1, 0.2]", "eps = [0.1]")
    run(load_spec(write_spec(tmp_path, one, "one.toml")), store)
    other = write_spec(tmp_path, one.replace("limit = 5", "limit = 6"), "other.toml")
    with pytest.raises(UserError, match=r"incompatible with .*other.toml.*--force"):
        run(load_spec(other), store)
    assert harness_main(["run", str(other), "--out", str(store), "--quiet", "--no-report"]) == 2
    assert capsys.readouterr().err.count("abscert-bench: error:") == 1
    report = run(load_spec(other), store, force=True)
    assert report.count("done") == 1 and Store(store).metadata()["source"].endswith("other.toml")


def test_foreign_folder_is_never_wiped(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    for force in (False, True):
        with pytest.raises(UserError, match="not a suite results store"):
            run(load_spec(write_spec(tmp_path, CHEAP)), folder, force=force)
    assert (folder / "thesis.tex").read_text() == "precious"


def test_missing_data_is_skipped_not_failed(tmp_path):
    spec = load_spec(write_spec(tmp_path, CHEAP.replace('"digits"', '"digits", "mnist"')))
    report = run(spec, tmp_path / "store", data_root=str(tmp_path / "empty"))
    skipped = [Store(tmp_path / "store").result(i) for i in report.ran if "mnist" in i]
    assert len(skipped) == 3 and all(r["status"] == "skipped" for r in skipped)
    assert "data missing" in skipped[0]["reason"] and "abscert-bench data prepare" in skipped[0]["reason"]
    assert report.count("failed") == 0 and "skipped: data missing" in report.summary()


def test_time_cap_stops_a_cell(tmp_path):
    text = CHEAP.replace("eps = [0.05, 0.1, 0.2]", "eps = [0.1]").replace("[methods.natural]", "[methods.ibp]") \
        .replace("limit = 300", "limit = 0").replace("epochs = 1", "epochs = 50") + "[limits]\ntime_cap_s = 0.3\n"
    report = run(load_spec(write_spec(tmp_path, text)), tmp_path / "store")
    result = Store(tmp_path / "store").result("digits_fc3_eps0.1_ibp_s0")
    assert result["status"] == "stopped" and "time cap" in result["reason"], result
    assert report.count("stopped") == 1
    from abscert_bench.owned import RUN, is_kind
    run_dir = tmp_path / "store" / "cells" / "digits_fc3_eps0.1_ibp_s0" / "run"
    assert not (run_dir / "checkpoint.pt").exists() and is_kind(run_dir, RUN)  # stopped, still the tool's folder
    rows = scalability_rows(tmp_path / "store")
    assert rows[0]["status"] == "stopped" and "time cap" in rows[0]["reason"]


def test_per_verifier_limit_and_stage_caps(tmp_path):
    text = CHEAP.replace("eps = [0.05, 0.1, 0.2]", "eps = [0.1]").replace('verifiers = ["ibp"]',
                                                                          'verifiers = ["ibp", "crown"]') \
        + "[verify.options.crown]\nlimit = 2\n[limits]\ntime_cap_s = 0.001\ntrain_time_cap_s = 600\n" \
        + "verify_time_cap_s = 600\n"
    spec = load_spec(write_spec(tmp_path, text))
    assert spec.cells[0]["limits"]["train_time_cap_s"] == 600  # the per-kind caps replace time_cap_s
    report = run(spec, tmp_path / "store")
    result = Store(tmp_path / "store").result(spec.cells[0].id)
    assert report.count("done") == 1, result
    assert result["stages"]["verify:ibp"]["samples"] == 5 and result["stages"]["verify:crown"]["samples"] == 2
    row = load_rows(tmp_path / "store")[0]
    assert row["ibp:samples"] == 5 and row["crown:samples"] == 2
    markdown = to_markdown([row])
    assert "n=2" in markdown and "n=5" not in markdown
    # a method entry may set its own training cap
    capped = load_spec(write_spec(tmp_path, CHEAP.replace("[methods.natural]", "[methods.natural]\n"
                                                          "train_time_cap_s = 5\n[methods.ibp]")))
    caps = {c["label"]: c["limits"]["train_time_cap_s"] for c in capped.cells}
    assert caps == {"natural": 5, "ibp": 0.0}
    # without the per-kind caps, time_cap_s caps both kinds of stage
    assert load_spec(write_spec(tmp_path, CHEAP + "[limits]\ntime_cap_s = 7\n")).cells[0]["limits"][
        "verify_time_cap_s"] == 7


def test_training_stopped_row_in_comparison_table(tmp_path):
    text = CHEAP.replace("eps = [0.05, 0.1, 0.2]", "eps = [0.1]").replace("[methods.natural]", "[methods.ibp]") \
        .replace("limit = 300", "limit = 0").replace("epochs = 1", "epochs = 50") + "[limits]\ntrain_time_cap_s = 0.3\n"
    run(load_spec(write_spec(tmp_path, text)), tmp_path / "store")
    rows = load_rows(tmp_path / "store")
    assert len(rows) == 1 and "time cap" in rows[0]["train_stopped"]
    markdown = to_markdown(rows)
    assert "| stopped |" in markdown and "Stopped — digits fc3 ε=0.1 ibp" in markdown
    assert "stopped" in to_latex(rows)


def test_train_limit_missing_classes_is_an_error(tmp_path, monkeypatch):
    from abscert_bench.data import load_dataset

    dataset = load_dataset("digits")
    order = torch.argsort(dataset.train_y, stable=True)  # a copy of the data ordered by class
    ordered = type(dataset)(dataset.name, dataset.train_x[order], dataset.train_y[order], dataset.test_x,
                            dataset.test_y, dataset.num_classes)
    monkeypatch.setattr(harness_execute, "_load", lambda name, root: ordered)
    params = load_spec(write_spec(tmp_path, CHEAP)).cells[0].params  # train.limit = 300: only 0s, 1s and a few 2s
    with pytest.raises(UserError, match="hold only .* of its 10 classes"):
        harness_execute.cell_dataset(params, None)
    everything = {**params, "train": {**params["train"], "limit": 0}}
    assert len(harness_execute.cell_dataset(everything, None).train_x) == len(dataset.train_x)


def test_cells_are_handed_out_longest_first():
    from abscert_bench.harness.cluster import longest_first
    from abscert_bench.harness.cost import estimate_cell_cost, forward_macs

    assert forward_macs("fc3", (1, 8, 8)) < forward_macs("dm_small", (1, 8, 8)) < forward_macs("dm_large", (1, 8, 8))
    cells = load_spec(ROOT / "specs" / "scalability.toml").cells
    ordered = [c.id for c in longest_first(cells)]
    assert ordered[0] == "digits_resnet18_eps0.1_crown-ibp_s0" and ordered[-1] == "digits_fc3_eps0.1_natural_s0"
    costs = [estimate_cell_cost(c.params) for c in longest_first(cells)]
    assert costs == sorted(costs, reverse=True)
    quick = {c.id: estimate_cell_cost(c.params) for c in load_spec(ROOT / "specs" / "quick.toml").cells}
    assert quick["digits_dm_small_eps0.1_crown-ibp_s0"] > quick["digits_dm_small_eps0.1_natural_s0"] > \
        quick["digits_dm_small_eps0.1_abscert_s0"]


def test_stage_guard_turns_a_huge_allocation_into_a_stop():
    """One allocation far over the memory cap fails inside the stage (address-space limit) and is a stop."""
    import resource

    before = resource.getrlimit(resource.RLIMIT_AS)
    with StageGuard(memory_cap_mb=256) as guard:
        torch.empty(8 * 2**30, dtype=torch.uint8).fill_(1)  # 8 GiB at once: faster than any sampling
    assert guard.stopped and "out of memory" in guard.stopped
    assert resource.getrlimit(resource.RLIMIT_AS) == before  # the limit is lifted after the stage
    torch.empty(512 * 2**20, dtype=torch.uint8).fill_(1)  # and ordinary allocations work again


def test_stage_guard_measures_and_stops():
    with StageGuard(time_cap_s=0.1) as guard:
        while True:
            sum(range(1000))
    assert guard.stopped and "time cap" in guard.stopped and guard.seconds < 2
    with StageGuard(memory_cap_mb=0) as guard:
        block = bytearray(64 * 2**20)
        block[::4096] = b"x" * len(block[::4096])
        time.sleep(0.1)
    assert guard.stopped is None and guard.peak_rss_mb > 32


def test_dask_two_workers_same_cells(tmp_path):
    pytest.importorskip("distributed")
    spec = load_spec(write_spec(tmp_path, CHEAP))
    report = run(spec, tmp_path / "dask", workers=2)
    assert report.count("done") == 3, report.summary()
    assert cell_dirs(tmp_path / "dask") == sorted(c.id for c in spec.cells)
    results = [Store(tmp_path / "dask").result(c.id) for c in spec.cells]
    assert all(r["torch_threads"] == 1 for r in results)
    # natural training ignores eps: one cell trained the model, the two others waited for it and reused it
    assert sorted(bool(r["stages"]["train"].get("reused")) for r in results) == [False, True, True]
    assert len({r["pid"] for r in results}) >= 1 and all(r["pid"] != os.getpid() for r in results)


# -- tables and plots -----------------------------------------------------------------------------------------------
def fake_rows():
    base = {"dataset": "mnist", "model": "dm_small", "eps": 0.1}
    return [
        {**base, "method": "abscert (d=0.2, point)", "label": "abscert_a", "clean_acc": 0.95, "train_s_per_epoch": 1.0,
         "abscert-paper:verified_acc": 0.9, "abscert-paper:ms_per_sample": 0.1,
         "abscert-sound:verified_acc": 0.7, "abscert-sound:ms_per_sample": 30.0, "paper_accepted_sound_falsified": 4},
        {**base, "method": "abscert (d=0.4, point)", "label": "abscert_b", "clean_acc": 0.97, "train_s_per_epoch": 2.0,
         "abscert-paper:verified_acc": 0.95, "abscert-sound:verified_acc": 0.6},
        {**base, "method": "ibp", "label": "ibp", "clean_acc": 0.9, "train_s_per_epoch": 4.0,
         "ibp:verified_acc": 0.4, "ibp:ms_per_sample": 2.0, "crown:verified_acc": 0.5, "crown:ms_per_sample": 5.0},
        {**base, "method": "crown-ibp", "label": "crown-ibp", "clean_acc": 0.9, "train_s_per_epoch": 8.0,
         "crown:verified_acc": 0.45, "alpha-crown:verified_acc": 0.45},
        {**base, "method": "natural", "label": "natural", "clean_acc": 0.99, "train_s_per_epoch": 0.5,
         "crown:verified_acc": 0.9},
    ]


def test_comparison_numbers_from_known_rows():
    entries = {e["meaning"]: e for e in comparisons(fake_rows())}
    paper, sound = entries["abscert-paper"], entries["abscert-sound"]
    assert paper["baseline"] == sound["baseline"] == "ibp" and paper["baseline_verifier"] == "crown"
    assert paper["abscert"] == "abscert_b" and paper["reduction"] == pytest.approx((0.5 - 0.05) / 0.5)
    assert paper["speedup"] == pytest.approx(4.0 / 2.0)
    assert sound["abscert"] == "abscert_a" and sound["reduction"] == pytest.approx((0.5 - 0.3) / 0.5)
    assert sound["speedup"] == pytest.approx(4.0)


def test_best_bound_ignores_a_verifier_run_on_fewer_images():
    row = {**fake_rows()[2], "ibp:samples": 100, "crown:samples": 100,
           "alpha-crown:verified_acc": 0.9, "alpha-crown:samples": 10}  # 10 % error on 10 images only
    entries = comparisons([row, fake_rows()[0]])
    assert entries[0]["baseline_verifier"] == "crown" and entries[0]["baseline_error"] == pytest.approx(0.5)


def test_markdown_and_latex_tables():
    markdown = to_markdown(fake_rows())
    for column in ["clean err %", "AbsCert paper err %", "AbsCert sound err %", "IBP err %", "CROWN err %",
                   "α-CROWN err %", "train s/epoch", "relative reduction %", "training speed-up ×",
                   "paper ✓ / sound ✗"]:
        assert column in markdown
    assert "| 90.0 | 2.00 | 4.00 | 2.00 |" in markdown  # paper: reduction 90 %, s/epoch 2 vs 4, speed-up 2
    assert "| ibp (CROWN) | 10.0 | 50.0 | 90.0 |" in markdown  # best baseline, its clean and verified error
    assert "| 40.0 | 1.00 | 4.00 | 4.00 |" in markdown  # sound: reduction 40 %, speed-up 4
    assert "| 30.0 (30.0) |" in markdown  # sound verified error 30 % at 30 ms/sample
    latex = to_latex(fake_rows())
    for token in [r"\toprule", r"\midrule", r"\bottomrule", r"\cmidrule", "AbsCert paper", "AbsCert sound",
                  r"$\alpha$-CROWN", r"abscert\_a", "90.0", "40.0", "4.00", r"\multicolumn"]:
        assert token in latex, token
    assert latex.count(r"\begin{tabular}") == 2 and "abscert_a" not in latex


def test_tables_and_plots_from_store(tiny_store, tmp_path, capsys):
    _, store, _ = tiny_store
    rows = load_rows(store)
    assert {r["label"] for r in rows} == {"natural", "abscert", "ibp"}
    code = harness_main(["run-table", str(store), "--latex", str(tmp_path / "t.tex"), "--plots", str(tmp_path / "p")])
    out = capsys.readouterr().out
    assert code == 0 and "AbsCert sound err %" in out and "relative reduction %" in out
    assert r"\toprule" in (tmp_path / "t.tex").read_text()
    for stem in ["verified_error_vs_eps", "train_time_vs_parameters", "paper_accuracy_vs_granularity"]:
        for suffix in (".png", ".pdf"):
            assert (tmp_path / "p" / (stem + suffix)).stat().st_size > 1000, stem
    assert harness_main(["run-table", str(store), "--scalability"]) == 0
    assert "parameters" in capsys.readouterr().out


def test_plot_functions_on_fake_rows(tmp_path):
    rows = fake_rows() + [{**r, "eps": 0.2} for r in fake_rows()]
    assert [p.suffix for p in plot_error_vs_eps(rows, tmp_path)] == [".png", ".pdf"]
    scal = [{"label": "ibp", "parameters": 1000 * 10 ** i, "train_s_per_epoch": 1.0 + i, "model": f"m{i}"}
            for i in range(3)]
    assert len(plot_time_vs_parameters(scal, tmp_path)) == 2
    assert len(plot_accuracy_vs_granularity(tmp_path, rows, tmp_path)) == 2
    assert all((tmp_path / f).exists() for f in ["verified_error_vs_eps.pdf", "train_time_vs_parameters.png",
                                                 "paper_accuracy_vs_granularity.png"])


# -- scalability models ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
def test_scalability_models_build_and_ibp_wraps(name):
    from abscert_bench.lirpa import bounded_module, margin_lower_bounds
    from abscert_bench.models import MODELS, count_parameters, create_model

    assert name in MODELS
    torch.manual_seed(0)
    model = create_model(name, (2, 8, 8), 10).eval()
    assert count_parameters(model) > 9_000_000
    for p in model.parameters():  # make the residual branches non-trivial
        p.data.normal_(0, 0.05)
    x = torch.rand(2, 2, 8, 8) * 0.8 + 0.1
    y = torch.tensor([1, 3])
    lower = margin_lower_bounds(bounded_module(model, x), x - 0.02, x + 0.02, y, 10, "ibp")
    with torch.no_grad():
        for _ in range(4):
            out = model(x + (torch.rand_like(x) * 2 - 1) * 0.02)
            margins = out.gather(1, y[:, None]) - out
            others = torch.stack([torch.cat([m[:k], m[k + 1:]]) for m, k in zip(margins, y.tolist())])
            assert (lower <= others + 1e-4).all()
