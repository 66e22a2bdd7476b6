"""Tests for abscert_bench.vnncomp: export, checks, VNN-LIB round trips, our ONNX loader, run-back, bad input."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from abscert_bench.abstraction import Abstraction, ball, phi_numpy
from abscert_bench.data import load_dataset
from abscert_bench.errors import UserError
from abscert_bench.rundir import read_json
from abscert_bench.trained import load_checkpoint
from abscert_bench.training.loop import TrainConfig, run_training
from abscert_bench.vnncomp import (
    SUPPORTED_OPS,
    export_benchmark,
    format_vnnlib,
    format_vnnlib2,
    hull_box,
    load_onnx,
    read_result,
    read_vnnlib,
    robustness_violation,
    run_benchmark,
)
from abscert_bench.vnncomp.onnx_export import ExportableDeployed, export_onnx, hull_network, onnxruntime_outputs
from abscert_bench.vnncomp.vnnlib import check_vnnlib2

EPS = 0.05
SAMPLES = 5
SEED = 1
RUNS = {
    "natural": ("natural", {}),
    "point": ("abscert", {"d": 0.2, "variant": "point"}),
    "region": ("abscert", {"d": 0.2, "variant": "region"}),
}
STATUS_OF = {"unsat": "verified", "sat": "falsified", "unknown": "unknown", "timeout": "unknown"}


@pytest.fixture(scope="module")
def digits():
    """The embedded digits dataset (own fixture: independent of conftest.py)."""
    return load_dataset("digits")


@pytest.fixture(scope="module")
def vnn_runs(tmp_path_factory, digits):
    """One tiny fc3 run directory per kind of model (one epoch on the embedded digits)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, (method, options) in RUNS.items():
        run_dir = root / name
        run_dir.mkdir()
        run_training(TrainConfig("digits", "fc3", method, EPS, epochs=1, method_options=options), digits, run_dir)
        out[name] = run_dir
    return out


@pytest.fixture(scope="module")
def benches(tmp_path_factory, vnn_runs):
    """Each run exported (with VNN-LIB 2.0 copies) and run back once."""
    root = tmp_path_factory.mktemp("benches")
    out = {}
    for name, run_dir in vnn_runs.items():
        folder = root / name
        meta = export_benchmark(run_dir, folder, SAMPLES, SEED, 30, vnnlib2=True)
        rows = run_benchmark(folder, use_sound_verifier=False)
        out[name] = (folder, meta, rows)
    return out


# ------------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("name", list(RUNS))
def test_export_layout(benches, name):
    folder, meta, _ = benches[name]
    lines = (folder / "instances.csv").read_text().splitlines()
    encodings = ["standard"] if name == "natural" else ["hull", "deployed"]
    assert meta["encodings"] == encodings
    assert len(lines) == SAMPLES * len(encodings)
    for line in lines:
        onnx_rel, vnn_rel, timeout = line.split(",")
        assert (folder / onnx_rel).is_file() and (folder / vnn_rel).is_file() and float(timeout) == 30
        assert (folder / vnn_rel.replace("vnnlib/", "vnnlib2/")).is_file()
    readme = (folder / "README.md").read_text()
    assert f"--samples {SAMPLES} --seed {SEED} --timeout 30 --vnnlib2" in readme
    assert all(f"`{e}`" in readme for e in encodings)
    assert meta["checks"]["vnnlib"] == "ok"
    assert meta["checks"]["vnnlib2"].startswith(("every file parsed", "skipped"))
    assert all(c["loader_ok"] for c in meta["checks"]["onnx"].values())
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.parametrize("name", list(RUNS))
def test_abcrown_config_lists_the_readable_instances(benches, name):
    """abcrown.yaml is α,β-CROWN's YAML (root_path, csv_name, complete_verifier, input shape of the ONNX it reads);
    its csv holds exactly the instances of the encodings auto_LiRPA can bound (no Floor: deployed is left out)."""
    import yaml

    folder, meta, _ = benches[name]
    config = yaml.safe_load((folder / "abcrown.yaml").read_text())
    assert config["general"] == {"root_path": ".", "csv_name": "instances-abcrown.csv", "complete_verifier": "bab"}
    assert config["bab"]["timeout"] == 30
    lines = (folder / config["general"]["csv_name"]).read_text().splitlines()
    expected = [f"{i['onnx']},{i['vnnlib']},30" for i in meta["instances"] if i["encoding"] != "deployed"]
    assert lines == expected and len(lines) == SAMPLES
    onnx_file = (folder / lines[0].split(",")[0])
    import onnx

    dims = [d.dim_value for d in onnx.load(onnx_file).graph.input[0].type.tensor_type.shape.dim]
    assert config["model"]["input_shape"] == [-1, *dims[1:]]


def test_export_is_regenerated_from_seed(benches, vnn_runs, tmp_path):
    folder, meta, _ = benches["natural"]
    again = tmp_path / "again"
    export_benchmark(vnn_runs["natural"], again, SAMPLES, SEED, 30)
    assert (again / "instances.csv").read_text() == (folder / "instances.csv").read_text()
    for vnn in (folder / "vnnlib").iterdir():
        assert (again / "vnnlib" / vnn.name).read_text() == vnn.read_text()


def test_vnnlib_files_hold_the_intended_boxes(benches, vnn_runs, digits):
    """Standard: the clipped ball; AbsCert hull: the reachable lower ends; deployed: the clipped ball."""
    for name in ("natural", "point"):
        folder, meta, _ = benches[name]
        trained = load_checkpoint(vnn_runs[name])
        for inst in meta["instances"]:
            x = digits.test_x[inst["index"]][None]
            assert int(digits.test_y[inst["index"]]) == inst["label"]
            lo, hi = ball(x, EPS) if inst["encoding"] != "hull" else hull_box(x, trained.abstraction, EPS)
            prop = read_vnnlib(folder / inst["vnnlib"])
            assert prop.same_as(lo.numpy(), hi.numpy(), robustness_violation(inst["label"], 10))


def test_existing_target_needs_force(benches, vnn_runs):
    folder, _, _ = benches["natural"]
    with pytest.raises(UserError, match="--force"):
        export_benchmark(vnn_runs["natural"], folder, 2, 0, 10)
    stamp = (folder / "instances.csv").read_text()
    assert stamp  # untouched


def test_force_overwrites_and_failure_leaves_nothing(vnn_runs, tmp_path, monkeypatch):
    target = tmp_path / "bench"
    export_benchmark(vnn_runs["natural"], target, 2, 0, 10)
    export_benchmark(vnn_runs["natural"], target, 3, 0, 10, force=True)
    assert len((target / "instances.csv").read_text().splitlines()) == 3
    import abscert_bench.vnncomp.benchmark as benchmark

    def broken(*args, **kwargs):
        raise UserError("simulated failure")

    monkeypatch.setattr(benchmark, "check_export", broken)
    with pytest.raises(UserError, match="simulated"):
        export_benchmark(vnn_runs["natural"], tmp_path / "fresh", 2, 0, 10)
    with pytest.raises(UserError, match="simulated"):
        export_benchmark(vnn_runs["natural"], target, 2, 0, 10, force=True)
    assert not (tmp_path / "fresh").exists()
    assert len((target / "instances.csv").read_text().splitlines()) == 3  # old folder kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]


@pytest.mark.parametrize("kwargs, match", [
    ({"timeout": 0}, "timeout must be > 0"),
    ({"timeout": -1}, "timeout must be > 0"),
    ({"timeout": float("nan")}, "timeout must be > 0"),
    ({"samples": 0}, "--samples"),
    ({"samples": 10_000}, "exceeds"),
])
def test_export_bad_arguments(vnn_runs, tmp_path, kwargs, match):
    args = {"samples": 2, "seed": 0, "timeout": 10, **kwargs}
    with pytest.raises(UserError, match=match):
        export_benchmark(vnn_runs["natural"], tmp_path / "b", **args)
    assert not (tmp_path / "b").exists()


def test_export_missing_run(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        export_benchmark(tmp_path / "nope", tmp_path / "b", 2, 0, 10)


# ------------------------------------------------------------------------------ the exported cell rule


@pytest.mark.parametrize("variant", ["point", "region"])
@pytest.mark.parametrize("d", [0.2, 0.1, 0.25, 0.3, 1 / 3, 0.05, 0.07, 1.0])
def test_exported_cell_rule_is_exact(tmp_path, variant, d):
    """onnxruntime on the exported abstraction equals abstraction.py bit for bit on all 8-bit levels and
    floats next to every cell edge."""
    abstraction = Abstraction(variant, d, min(0.05, d / 2))
    edges = np.arange(0, 1.0 + d, d).astype(np.float32)
    values = np.concatenate([np.arange(256) / 255.0, edges, np.nextafter(edges, np.float32(2)),
                             np.nextafter(edges, np.float32(-1)), np.linspace(0, 1, 97)])
    values = np.clip(values, 0, 1).astype(np.float32)
    values = np.resize(values, 8 * 64)
    x = values.reshape(8, 1, 8, 8)
    module = ExportableDeployed(abstraction, nn.Identity()).eval()
    path = tmp_path / "phi.onnx"
    export_onnx(module, (1, 8, 8), path)
    got = onnxruntime_outputs(path, x)
    expected = abstraction(torch.from_numpy(x)).numpy()
    assert np.array_equal(got, expected)
    if variant == "point":
        assert np.array_equal(got, phi_numpy(x, d))
    loaded = load_onnx(path)
    with torch.no_grad():
        assert torch.equal(loaded(torch.from_numpy(x)), torch.from_numpy(expected))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1, width=32), min_size=4, max_size=4), st.floats(0.0, 0.1),
       st.sampled_from(["point", "region"]), st.integers(0, 2**31 - 1))
def test_hull_box_contains_every_reachable_abstract_input(pixels, eps, variant, seed):
    abstraction = Abstraction(variant, 0.2, 0.05)
    x = torch.tensor(pixels, dtype=torch.float32).reshape(1, 1, 2, 2)
    lower, upper = hull_box(x, abstraction, eps)
    lo, hi = ball(x, eps)
    g = torch.Generator().manual_seed(seed)
    points = torch.cat([lo, hi, lo + torch.rand((20, 1, 2, 2), generator=g) * (hi - lo)])
    abstract = abstraction(points)
    if variant == "point":
        abstract = abstract[:, :1]
    assert bool((abstract >= lower).all() and (abstract <= upper).all())


# ------------------------------------------------------------------------------------------ VNN-LIB


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.floats(-2, 2, width=32), st.floats(0, 1, width=32)), min_size=1, max_size=6),
       st.integers(2, 5), st.data())
def test_vnnlib_roundtrip_exact(tmp_path_factory, box, num_outputs, data):
    lower = np.array([lo for lo, _ in box], dtype=np.float32)
    upper = (lower + np.array([w for _, w in box], dtype=np.float32)).astype(np.float32)
    label = data.draw(st.integers(0, num_outputs - 1))
    path = tmp_path_factory.mktemp("v") / "p.vnnlib"
    path.write_text(format_vnnlib(lower, upper, label, num_outputs, "comment"))
    prop = read_vnnlib(path, len(lower), num_outputs)
    assert prop.same_as(lower, upper, robustness_violation(label, num_outputs))
    y = np.zeros(num_outputs)
    y[label] = 1.0
    assert not prop.output_holds(y)
    y[(label + 1) % num_outputs] = 1.0
    assert prop.output_holds(y)


def test_vnnlib2_parses_with_the_vnnlib_package(tmp_path):
    pytest.importorskip("vnnlib")
    lower = np.array([0.0, 0.1, 0.30000001192092896, 0.5], dtype=np.float32)
    upper = np.array([0.05, 0.2, 0.4, 1.0], dtype=np.float32)
    path = tmp_path / "p2.vnnlib"
    path.write_text(format_vnnlib2(lower, upper, (1, 2, 2), 2, 4, "c"))
    assert check_vnnlib2(path, lower, upper, 2, 4) == "ok"
    with pytest.raises(UserError, match="different input box"):
        check_vnnlib2(path, lower, upper + 1, 2, 4)
    path.write_text("(vnnlib-version <2.0>) (declare-network N (declare-input X float32 [1,2]))")
    with pytest.raises(UserError, match="p2.vnnlib"):
        check_vnnlib2(path, lower, upper, 2, 4)


def test_vnnlib_reader_accepts_common_forms(tmp_path):
    path = tmp_path / "ok.vnnlib"
    path.write_text("""; comment
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(assert (and (>= X_0 -1) (<= X_0 1.5)))
(assert (<= 0.25 X_1))   ; bound written the other way round
(assert (<= X_1 0.75))
(assert (<= X_1 2))
(assert (>= (- Y_0 Y_1) 0.5))
""")
    prop = read_vnnlib(path, 2, 2)
    assert prop.lower.tolist() == [-1.0, 0.25] and prop.upper.tolist() == [1.5, 0.75]
    assert len(prop.disjuncts) == 1
    assert prop.output_holds([1.0, 0.0]) and not prop.output_holds([0.0, 0.0])


VNN_HEADER = "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
BOX = "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (>= X_1 0))\n(assert (<= X_1 1))\n"
OUT = "(assert (or (and (>= Y_1 Y_0))))\n"


@pytest.mark.parametrize("text, match", [
    (VNN_HEADER + BOX + "(assert (<= (+ X_0 X_1) 1))\n" + OUT, "line 9: non-box input constraint"),
    (VNN_HEADER + BOX + "(assert (or (<= X_0 0.5) (>= Y_1 Y_0)))\n", "line 9: non-box input constraint"),
    (VNN_HEADER + BOX + "(assert (<= X_0 Y_0))\n", "non-box input constraint"),
    (VNN_HEADER + "(assert (>= X_0 0.7))\n(assert (<= X_0 0.2))\n(assert (>= X_1 0))\n(assert (<= X_1 1))\n" + OUT,
     "line 6: X_0 lower bound 0.7 > upper bound 0.2"),
    (VNN_HEADER + "(assert (>= X_0 nan))\n(assert (<= X_0 1))\n(assert (>= X_1 0))\n(assert (<= X_1 1))\n" + OUT,
     "line 5: NaN"),
    (VNN_HEADER + "(assert (<= X_0 1))\n(assert (>= X_1 0))\n(assert (<= X_1 1))\n" + OUT, "X_0 has no lower bound"),
    (VNN_HEADER + BOX + "(assert (or (and (>= Y_1 Y_0))", "unbalanced"),
    (VNN_HEADER + BOX + "(assert (>= Y_2 Y_0))\n", "Y_2 is used but not declared"),
    (VNN_HEADER + BOX + "(check-sat)\n", "unsupported command"),
    ("(declare-const Z_0 Real)\n", "neither X_i nor Y_j"),
])
def test_vnnlib_reader_rejects(tmp_path, text, match):
    path = tmp_path / "bad.vnnlib"
    path.write_text(text)
    with pytest.raises(UserError, match=match) as info:
        read_vnnlib(path, 2, 2)
    assert "bad.vnnlib" in str(info.value) and "\n" not in str(info.value)


def test_vnnlib_wrong_variable_counts(tmp_path):
    path = tmp_path / "p.vnnlib"
    path.write_text(format_vnnlib(np.zeros(3), np.ones(3), 0, 2))
    with pytest.raises(UserError, match="declares 3 input variables X_\\*, the network has 4"):
        read_vnnlib(path, 4, 2)
    with pytest.raises(UserError, match="declares 2 output variables Y_\\*, the network has 10"):
        read_vnnlib(path, 3, 10)
    with pytest.raises(UserError, match="missing VNN-LIB file"):
        read_vnnlib(tmp_path / "none.vnnlib")


# ------------------------------------------------------------------------------------------- loader


def _single_node_model(op: str) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """A one-op graph (plus constants) exercising `op`, with its input shape."""
    rng = np.random.default_rng(0)

    def init(name, array):
        return numpy_helper.from_array(np.asarray(array, dtype=np.asarray(array).dtype), name)

    shape, inits, nodes = (1, 6), [], []
    if op in ("Add", "Sub", "Mul", "Div", "Min", "Max"):
        inits.append(init("c", rng.uniform(0.5, 2, (6,)).astype(np.float32)))
        nodes.append(helper.make_node(op, ["x", "c"], ["y"]))
    elif op in ("Relu", "Sigmoid", "Tanh", "Floor", "Neg", "Identity"):
        nodes.append(helper.make_node(op, ["x"], ["y"]))
    elif op == "MatMul":
        inits.append(init("w", rng.normal(size=(6, 3)).astype(np.float32)))
        nodes.append(helper.make_node(op, ["x", "w"], ["y"]))
    elif op == "Gemm":
        inits += [init("w", rng.normal(size=(3, 6)).astype(np.float32)),
                  init("b", rng.normal(size=3).astype(np.float32))]
        nodes.append(helper.make_node(op, ["x", "w", "b"], ["y"], transB=1, alpha=0.5, beta=2.0))
    elif op == "Flatten":
        shape = (1, 2, 3, 2)
        nodes.append(helper.make_node(op, ["x"], ["y"], axis=2))
    elif op == "Reshape":
        inits.append(init("s", np.array([0, 2, 3], dtype=np.int64)))
        nodes.append(helper.make_node(op, ["x", "s"], ["y"]))
    elif op == "Unsqueeze":
        inits.append(init("axes", np.array([-1, 1], dtype=np.int64)))
        nodes.append(helper.make_node(op, ["x", "axes"], ["y"]))
    elif op == "Squeeze":
        shape = (1, 6, 1)
        inits.append(init("axes", np.array([-1], dtype=np.int64)))
        nodes.append(helper.make_node(op, ["x", "axes"], ["y"]))
    elif op == "Concat":
        inits.append(init("c", rng.normal(size=(1, 2)).astype(np.float32)))
        nodes.append(helper.make_node(op, ["x", "c"], ["y"], axis=1))
    elif op == "Constant":
        nodes += [helper.make_node(op, [], ["k"], value=numpy_helper.from_array(np.float32([1.5] * 6))),
                  helper.make_node("Mul", ["x", "k"], ["y"])]
    elif op == "Cast":
        nodes += [helper.make_node(op, ["x"], ["x64"], to=TensorProto.DOUBLE),
                  helper.make_node("Cast", ["x64"], ["y"], to=TensorProto.FLOAT)]
    elif op == "Clip":
        inits += [init("lo", np.float32(-0.2)), init("hi", np.float32(0.3))]
        nodes.append(helper.make_node(op, ["x", "lo", "hi"], ["y"]))
    elif op == "Conv":
        shape = (1, 2, 5, 5)
        inits += [init("w", rng.normal(size=(3, 2, 3, 3)).astype(np.float32)),
                  init("b", rng.normal(size=3).astype(np.float32))]
        nodes.append(helper.make_node(op, ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2]))
    elif op == "AveragePool":
        shape = (1, 2, 4, 4)
        nodes.append(helper.make_node(op, ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2]))
    else:  # pragma: no cover
        raise AssertionError(op)
    out_shape = {"MatMul": (1, 3), "Gemm": (1, 3), "Flatten": (2, 6), "Reshape": (1, 2, 3), "Concat": (1, 8),
                 "Unsqueeze": (1, 1, 6, 1), "Squeeze": (1, 6),
                 "Conv": (1, 3, 3, 3), "AveragePool": (1, 2, 2, 2)}.get(op, shape)
    graph = helper.make_graph(nodes, op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model, shape


@pytest.mark.parametrize("op", SUPPORTED_OPS)
def test_loader_matches_onnxruntime_on_every_op(tmp_path, op):
    model, shape = _single_node_model(op)
    path = tmp_path / f"{op}.onnx"
    onnx.save(model, str(path))
    x = np.random.default_rng(1).uniform(-2, 2, shape).astype(np.float32)
    expected = onnxruntime_outputs(path, x)
    with torch.no_grad():
        got = load_onnx(path)(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_loader_covers_every_emitted_op(benches):
    emitted = set()
    for folder, _, _ in benches.values():
        for path in (folder / "onnx").iterdir():
            emitted |= {n.op_type for n in onnx.load(str(path)).graph.node}
    assert emitted <= set(SUPPORTED_OPS), emitted - set(SUPPORTED_OPS)
    assert {"Floor", "Gemm", "Concat", "Relu"} <= emitted and "Cast" not in emitted


def test_loader_on_lenet_and_dm_small(tmp_path):
    """Conv / AveragePool / Flatten graphs as torch exports them, loader == torch."""
    from abscert_bench.models import create_model

    for name in ("lenet5", "dm_small"):
        model = create_model(name, (1, 8, 8), 10, activation="tanh").eval()
        path = tmp_path / f"{name}.onnx"
        export_onnx(model, (1, 8, 8), path)
        x = torch.rand(3, 1, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(load_onnx(path)(x), model(x), rtol=1e-5, atol=1e-6)


def test_loader_rejects_unsupported_and_malformed(tmp_path):
    graph = helper.make_graph([helper.make_node("LeakyRelu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 2))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, (1, 2))])
    path = tmp_path / "leaky.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    with pytest.raises(UserError, match="leaky.onnx: unsupported ONNX op\\(s\\) LeakyRelu"):
        load_onnx(path)
    data = path.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="malformed ONNX file .*cut.onnx"):
        load_onnx(tmp_path / "cut.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\xff\x00not onnx at all")
    with pytest.raises(UserError, match="junk.onnx"):
        load_onnx(tmp_path / "junk.onnx")
    with pytest.raises(UserError, match="missing ONNX file"):
        load_onnx(tmp_path / "none.onnx")


# ----------------------------------------------------------------------------------------- run-back


def _reference_standard(run_dir, digits, indices):
    from abscert_bench.verification import create_verifier, run_cascade

    trained = load_checkpoint(run_dir)
    stages = [create_verifier("crown"), create_verifier("pgd")]
    return run_cascade(stages, trained, digits.test_x[indices], digits.test_y[indices], EPS)


def test_runback_agrees_with_run_directory_standard(benches, vnn_runs, digits):
    _, meta, rows = benches["natural"]
    indices = [inst["index"] for inst in meta["instances"]]
    reference = _reference_standard(vnn_runs["natural"], digits, indices)
    assert [STATUS_OF[r["result"]] for r in rows] == [r.status for r in reference]
    assert {r["result"] for r in rows} <= {"sat", "unsat", "unknown"}


@pytest.mark.parametrize("name", ["point", "region"])
def test_runback_agrees_with_run_directory_abscert(benches, vnn_runs, digits, name):
    """unsat ⇐ the run's own hull CROWN bound (abscert-sound's first stage) proves the image, and an unsat CROWN
    cannot prove came from the exact MILP and is not falsified by abscert-sound; every sat
    is a real counterexample of the run's deployed classifier within the clipped ball."""
    from abscert_bench.lirpa import bounded_module, margin_lower_bounds

    folder, meta, rows = benches[name]
    trained = load_checkpoint(vnn_runs[name])
    classifier = trained.classifier()
    hull = hull_network(trained.abstraction, trained.network)
    for row in rows:
        index, label = int(row["index"]), int(row["label"])
        x, y = digits.test_x[index][None], torch.tensor([label])
        lower, upper = hull_box(x, trained.abstraction, EPS)
        bounds = margin_lower_bounds(bounded_module(hull, lower), lower, upper, y, 10, "crown")
        verified = bool((bounds > 0).all())
        if row["result"] == "unsat" and not verified:  # the exact MILP proved what CROWN could not:
            assert row["method"] == "milp", row  # the deployed classifier must then have no counterexample
            from abscert_bench.verification import create_verifier, run_cascade
            sound = run_cascade([create_verifier("abscert-sound")], trained, x, y, EPS)[0]
            assert sound.status != "falsified", (row, sound)
        else:
            assert (row["result"] == "unsat") == verified, row
        if row["result"] == "sat":
            result, cx, _ = read_result(folder / row["result_file"])
            lo, hi = ball(x, EPS)
            if row["encoding"] == "hull":  # a corner of the hull box ↔ each pixel at lo or hi
                at_hi = cx.reshape(-1)[: lo.numel()] != lower.reshape(-1)[: lo.numel()].numpy()
                cx = np.where(at_hi, hi.reshape(-1).numpy(), lo.reshape(-1).numpy())
            concrete = torch.as_tensor(cx, dtype=torch.float32).reshape(x.shape)
            assert bool((concrete >= lo).all() and (concrete <= hi).all())
            with torch.no_grad():
                assert int(classifier(concrete).argmax()) != label
    deployed = [r["result"] for r in rows if r["encoding"] == "deployed"]
    hull_rows = [r["result"] for r in rows if r["encoding"] == "hull"]
    # the hull is a relaxation of the deployed classifier: never unsat where the deployed one has a counterexample
    # (the MILP may prove a hull instance that abscert-sound leaves open, so the two verdicts need not be equal)
    for deployed_result, hull_result in zip(deployed, hull_rows):
        assert not (hull_result == "unsat" and deployed_result == "sat")
    assert sum(r == "unsat" for r in hull_rows) >= 1 and sum(r == "sat" for r in deployed) >= 1


def test_runback_with_sound_verifier_when_registered(benches, vnn_runs, digits, tmp_path):
    from abscert_bench.verification import create_verifier

    try:
        sound = create_verifier("abscert-sound")
    except UserError:
        pytest.skip("abscert-sound is not registered yet")
    folder, meta, _ = benches["point"]
    rows = run_benchmark(folder, tmp_path / "r.csv", use_sound_verifier=True)
    trained = load_checkpoint(vnn_runs["point"])
    for row in rows:
        if row["encoding"] != "deployed":
            continue
        index = int(row["index"])
        expected = sound.verify(trained, digits.test_x[index][None], digits.test_y[index][None], EPS)[0].status
        got = STATUS_OF[row["result"]]
        assert got == expected or (expected == "unknown" and got == "falsified"), (row, expected)


@pytest.mark.parametrize("name", list(RUNS))
def test_result_files_are_vnncomp_and_checked(benches, name):
    folder, _, rows = benches[name]
    assert Path(folder / "results.csv").is_file()
    for row in rows:
        result, x, y = read_result(folder / row["result_file"])
        assert result == row["result"]
        if result != "sat":
            continue
        model = onnx.load(str(folder / row["onnx_file"]))
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        prop = read_vnnlib(folder / row["vnnlib_file"])
        assert prop.input_inside(x)
        ort_y = onnxruntime_outputs(folder / row["onnx_file"], x.astype(np.float32).reshape(shape)).reshape(-1)
        np.testing.assert_allclose(y, ort_y, rtol=1e-5, atol=1e-5)
        assert prop.output_holds(ort_y)


def test_runback_timeout(benches, tmp_path):
    folder, _, _ = benches["natural"]
    copy = tmp_path / "b"
    shutil.copytree(folder, copy)
    lines = [line.rsplit(",", 1)[0] + ",1e-9" for line in (copy / "instances.csv").read_text().splitlines()]
    (copy / "instances.csv").write_text("\n".join(lines) + "\n")
    rows = run_benchmark(copy, tmp_path / "out.csv")
    assert {r["result"] for r in rows} == {"timeout"}
    assert (copy / rows[0]["result_file"]).read_text() == "timeout\n"
    assert rows[0]["result_file"].startswith("../out/")  # relative to the folder, wherever `vnncomp run` ran
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    rows = run_benchmark(moved)
    assert all(not Path(r["result_file"]).is_absolute() and (moved / r["result_file"]).is_file() for r in rows)


def test_runback_without_metadata_is_generic(benches, tmp_path):
    """A plain VNN-COMP folder (no benchmark.json): standard answers; Floor networks only sat or unknown."""
    folder, _, _ = benches["point"]
    copy = tmp_path / "b"
    shutil.copytree(folder, copy)
    (copy / "benchmark.json").unlink()
    rows = run_benchmark(copy)
    for row in rows:
        if "deployed" in row["onnx_file"]:
            assert row["result"] in ("sat", "unknown")


@pytest.mark.parametrize("mutate, match", [
    (lambda f: (f / "onnx" / "model.onnx").write_bytes((f / "onnx" / "model.onnx").read_bytes()[:100]),
     "malformed ONNX file .*model.onnx"),
    (lambda f: (f / "instances.csv").write_text("onnx/model.onnx,vnnlib/none.vnnlib,10\n"),
     "instances.csv: line 1: missing file .*none.vnnlib"),
    (lambda f: (f / "instances.csv").write_text(
        (f / "instances.csv").read_text().splitlines()[0] + "\nonnx/none.onnx,vnnlib/x.vnnlib,10\n"),
     "instances.csv: line 2: missing file .*none.onnx"),
    (lambda f: (f / "instances.csv").write_text(
        (f / "instances.csv").read_text().splitlines()[0].rsplit(",", 1)[0] + ",0\n"),
     "instances.csv: line 1: timeout must be > 0"),
    (lambda f: (f / "instances.csv").write_text(
        (f / "instances.csv").read_text().splitlines()[0].rsplit(",", 1)[0] + ",-3\n"),
     "instances.csv: line 1: timeout must be > 0"),
    (lambda f: (f / "instances.csv").write_text("onnx/model.onnx\n"), "instances.csv: line 1: expected"),
    (lambda f: (f / "instances.csv").write_text(""), "lists no instances"),
    (lambda f: (f / "instances.csv").unlink(), "missing .*instances.csv"),
    (lambda f: [p.write_text(format_vnnlib(np.zeros(5), np.ones(5), 0, 10)) for p in (f / "vnnlib").iterdir()],
     "declares 5 input variables X_\\*, the network has 64"),
])
def test_runback_bad_folders(benches, tmp_path, mutate, match):
    folder, _, _ = benches["natural"]
    copy = tmp_path / "b"
    shutil.copytree(folder, copy)
    mutate(copy)
    with pytest.raises(UserError, match=match) as info:
        run_benchmark(copy, tmp_path / "out.csv")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out.csv").exists()


def test_runback_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        run_benchmark(tmp_path / "nothing")


@pytest.mark.parametrize("answer", ["verified", "falsified", "unknown"])
def test_deployed_runback_maps_to_the_sound_verifier(benches, tmp_path, monkeypatch, answer):
    """With benchmark.json naming the abstraction, deployed instances go to `abscert-sound` on (N loaded
    from onnx/network.onnx, abstraction, image, eps); its counterexamples are re-checked on the ONNX."""
    import abscert_bench.verification as verify_pkg
    from abscert_bench.verification.base import SampleResult

    folder, meta, baseline = benches["point"]
    seen = []

    class FakeSound:
        def verify(self, trained, x, y, eps, **kwargs):
            seen.append((type(trained.network).__name__, trained.abstraction.to_dict(), float(eps)))
            lo, hi = ball(x, eps)
            cex = None
            if answer == "falsified":  # the corner the run-back's own search found, if any, else the image
                cex = x[0].numpy()
                with torch.no_grad():
                    for candidate in (lo, hi):
                        if int(trained.classifier()(candidate).argmax()) != int(y[0]):
                            cex = candidate[0].numpy()
            return [SampleResult(0, int(y[0]), answer, 0.0, "abscert-sound", cex)]

    monkeypatch.setattr(verify_pkg, "create_verifier", lambda name, **kw: FakeSound())
    rows = run_benchmark(folder, tmp_path / "r.csv", use_sound_verifier=True)
    assert seen and all(s == ("OnnxModule", meta["abstraction"], EPS) for s in seen)
    for row, before in zip(rows, baseline):
        if row["encoding"] != "deployed":
            assert row["result"] == before["result"]
        elif row["method"] == "corner":  # the corner search vnn_runs first and is unchanged
            assert row["result"] == "sat" and before["result"] == "sat"
        elif answer == "verified":
            assert (row["result"], row["method"]) == ("unsat", "abscert-sound")
        elif answer == "unknown":
            assert row["result"] == "unknown" and before["result"] != "sat"
        else:
            # a claimed counterexample counts only after the re-check on the deployed ONNX
            assert row["result"] == ("unknown" if before["result"] == "unsat" else row["result"])
            assert row["result"] in ("sat", "unknown")
    assert any(r["method"] == "abscert-sound" for r in rows) or answer != "verified"


@pytest.mark.parametrize("d", [0.2, 0.25, 0.3, 0.07])
@pytest.mark.parametrize("model_name", ["fc3", "dm_small"])
def test_hull_network_is_plain_feed_forward(tmp_path, d, model_name):
    """The hull ONNX has only Conv / Gemm / Relu / Flatten with float32 constants (no Concat, Sub, Cast), no extra
    op when d divides 1 and N starts with an affine layer whose constant term is a bias, and computes
    N([L, min(L + d, 1)]) on L in [0, 1]."""
    from abscert_bench.models import create_model
    from abscert_bench.models.hull import PointHullNetwork
    from abscert_bench.training.lower_form import divides_one

    torch.manual_seed(0)
    net = create_model(model_name, (2, 8, 8), 10).eval()
    hull = hull_network(Abstraction("point", d), net, channels=1)
    path = tmp_path / "hull.onnx"
    export_onnx(hull, (1, 8, 8), path)
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert set(ops) <= {"Conv", "Gemm", "Relu", "Flatten", "MatMul", "Add", "Reshape", "Constant"}, ops
    assert {t.data_type for t in model.graph.initializer} <= {TensorProto.FLOAT, TensorProto.INT64}
    net_path = tmp_path / "net.onnx"
    export_onnx(net, (2, 8, 8), net_path)
    net_ops = [n.op_type for n in onnx.load(str(net_path)).graph.node]
    if divides_one(d) and model_name == "fc3":
        assert ops == net_ops
    lower = torch.rand(6, 1, 8, 8) * (1 - d)
    lower[0] = 1.0 - d  # the last full cell's lower end
    if not divides_one(d):  # lower ends reach the clipped last cell
        lower[1] = torch.rand(1, 8, 8)
    with torch.no_grad():
        expected = PointHullNetwork(net, d)(lower).numpy()
    assert np.allclose(onnxruntime_outputs(path, lower.numpy()), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ VNN-COMP conventions


def _tree(folder, subdirs=("vnnlib",)):
    files = {"instances.csv": (folder / "instances.csv").read_bytes()}
    for sub in subdirs:
        files.update({f"{sub}/{p.name}": p.read_bytes() for p in sorted((folder / sub).iterdir())})
    return files


@pytest.mark.parametrize("name", list(RUNS))
def test_generate_properties_reproduces_the_export(benches, tmp_path, name):
    """The folder's standalone generate_properties.py (numpy only, run from elsewhere, no abscert_bench on the path)
    rewrites vnnlib/ and instances.csv byte for byte, for any seed (the default pool is the exported images)."""
    import subprocess
    import sys

    folder, _, _ = benches[name]
    copy = tmp_path / "b"
    shutil.copytree(folder, copy)
    expected = _tree(folder)
    shutil.rmtree(copy / "vnnlib")
    (copy / "vnnlib").mkdir()
    (copy / "instances.csv").unlink()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for seed in (SEED, 7):
        subprocess.run([sys.executable, "-I", str(copy / "generate_properties.py"), str(seed)], check=True,
                       cwd=tmp_path, env=env, capture_output=True)
        assert _tree(copy) == expected
    assert (copy / "benchmark.json").read_bytes() == (folder / "benchmark.json").read_bytes()


def test_generate_properties_picks_like_export_from_a_pool(benches, vnn_runs, digits, tmp_path):
    """With the whole test set as the pool, a seed gives the files `export --seed` writes for that seed."""
    import subprocess
    import sys

    folder, _, _ = benches["point"]
    pool = tmp_path / "pool.npz"
    np.savez(pool, index=np.arange(len(digits.test_x)), label=digits.test_y.numpy(), x=digits.test_x.numpy())
    other = export_benchmark(vnn_runs["point"], tmp_path / "seed3", SAMPLES, 3, 30)
    copy = tmp_path / "b"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "vnnlib")
    (copy / "vnnlib").mkdir()
    subprocess.run([sys.executable, "-I", str(copy / "generate_properties.py"), "3", "--images", str(pool)],
                   check=True, capture_output=True)
    assert _tree(copy) == _tree(tmp_path / "seed3")
    assert [i["index"] for i in read_json(copy / "benchmark.json")["instances"]] == \
        [i["index"] for i in other["instances"]]
    rows = run_benchmark(copy, use_sound_verifier=False)
    assert {int(r["index"]) for r in rows} == {i["index"] for i in other["instances"]}


def test_gzip_export_is_vnncomp_2024_and_runs_back(benches, vnn_runs, tmp_path):
    """--gzip: .onnx.gz / .vnnlib.gz (reproducible bytes), instances.csv naming the uncompressed paths; the
    run-back reads them and answers as on the plain folder; generate_properties.py writes .gz files too."""
    import gzip
    import subprocess
    import sys

    plain, _, plain_rows = benches["point"]
    folder = tmp_path / "gz"
    export_benchmark(vnn_runs["point"], folder, SAMPLES, SEED, 30, vnnlib2=True, gzip=True)
    assert not list(folder.glob("onnx/*.onnx")) and not list(folder.glob("vnnlib*/*.vnnlib"))
    for path in folder.glob("*/*.gz"):
        assert gzip.decompress(path.read_bytes()) == (plain / path.parent.name / path.name[:-3]).read_bytes()
    assert (folder / "instances.csv").read_bytes() == (plain / "instances.csv").read_bytes()
    assert "--gzip" in read_json(folder / "benchmark.json")["command"]
    rows = run_benchmark(folder, use_sound_verifier=False)
    assert [r["result"] for r in rows] == [r["result"] for r in plain_rows]
    expected = _tree(folder)
    shutil.rmtree(folder / "vnnlib")
    (folder / "vnnlib").mkdir()
    subprocess.run([sys.executable, "-I", str(folder / "generate_properties.py"), "0"], check=True,
                   capture_output=True)
    assert _tree(folder) == expected
