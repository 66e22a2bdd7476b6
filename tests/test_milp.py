"""The exact MILP of `vnncomp run` (vnncomp/milp.py): extraction is the network, verdicts are right, it decides
what CROWN and PGD leave open."""
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import abscert_bench as ab
from abscert_bench.data import load_dataset
from abscert_bench.models import create_model
from abscert_bench.vnncomp.milp import decide, extract
from abscert_bench.vnncomp.onnx_export import export_onnx
from abscert_bench.vnncomp.onnx_loader import load_onnx
from abscert_bench.vnncomp.runback import run_benchmark
from abscert_bench.vnncomp.vnnlib import format_vnnlib, read_vnnlib


def onnx_of(module: nn.Module, shape, path):
    export_onnx(module.eval(), shape, path)
    return load_onnx(path)


def test_extraction_reproduces_conv_and_hull_networks(tmp_path):
    torch.manual_seed(0)
    net = create_model("dm_small", (2, 8, 8), 10)
    loaded = onnx_of(net, (2, 8, 8), tmp_path / "net.onnx")
    form = extract(loaded)
    assert form is not None and len(form.layers) == 3
    x = torch.rand(5, 2, 8, 8)
    with torch.no_grad():
        expected = net(x).double().numpy()
    for i in range(5):
        assert np.abs(form.evaluate(x[i].double().numpy()) - expected[i]).max() < 1e-5
    # the hull network: a 1×1 Conv + Relu gives [L, relu(L + d - 1)] (d = 0.3 does not divide 1), then N with its
    # upper ends L + d - relu(L + d - 1) computed by a second 1×1 Conv (N starts with a padded convolution)
    from abscert_bench.vnncomp.onnx_export import hull_network

    hull = hull_network(ab.Abstraction("point", 0.3), net, channels=1)
    hull_loaded = onnx_of(hull, (1, 8, 8), tmp_path / "hull.onnx")
    hull_form = extract(hull_loaded)
    assert hull_form is not None and len(hull_form.layers) == 4
    z = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        expected = hull(z).double().numpy()
    for i in range(3):
        assert np.abs(hull_form.evaluate(z[i].double().numpy()) - expected[i]).max() < 1e-5


def test_non_piecewise_linear_graph_is_refused(tmp_path):
    net = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3))
    assert extract(onnx_of(net, (4,), tmp_path / "sig.onnx")) is None


@pytest.mark.parametrize("seed", range(6))
def test_verdicts_agree_with_a_dense_grid(tmp_path, seed):
    """Small 2-input nets: unsat ⇒ no grid point violates; a violating grid point ⇒ sat; sat ⇒ a valid witness."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
    loaded = onnx_of(net, (2,), tmp_path / "net.onnx")
    form = extract(loaded)
    assert form is not None
    centre = np.array([0.5, 0.5])
    with torch.no_grad():
        label = int(net(torch.tensor(centre, dtype=torch.float32)[None]).argmax())
    for radius in (0.05, 0.2, 0.5):
        lower, upper = centre - radius, centre + radius
        (tmp_path / "p.vnnlib").write_text(format_vnnlib(lower, upper, label, 3))
        prop = read_vnnlib(tmp_path / "p.vnnlib", 2, 3)
        grid = np.stack(np.meshgrid(np.linspace(lower[0], upper[0], 301), np.linspace(lower[1], upper[1], 301)),
                        -1).reshape(-1, 2).astype(np.float32)
        with torch.no_grad():
            y = net(torch.from_numpy(grid)).numpy()
        grid_violates = bool((np.delete(y, label, axis=1).max(1) >= y[:, label]).any())
        outcome = decide(form, prop, loaded, 30.0)
        assert outcome.result in ("sat", "unsat")
        if outcome.result == "unsat":
            assert not grid_violates
        else:
            assert prop.input_inside(outcome.x)
            with torch.no_grad():
                assert prop.output_holds(loaded(torch.from_numpy(outcome.x)[None]).double().numpy().ravel())
        if grid_violates:
            assert outcome.result == "sat"


def test_run_back_decides_what_crown_and_pgd_leave_open(tmp_path):
    """A natural MLP on the digits at eps 0.1: CROWN + PGD leave instances unknown, the MILP decides every one."""
    torch.manual_seed(0)
    digits = load_dataset("digits")
    loader = DataLoader(TensorDataset(digits.train_x, digits.train_y), batch_size=64, shuffle=True)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
    trained = ab.train(net, loader, "natural", eps=0.0, epochs=10)
    folder = tmp_path / "bench"
    ab.export_vnncomp(trained, digits.test_x[:20], digits.test_y[:20], eps=0.1, out=folder, timeout=60)
    without = run_benchmark(folder, force=True, complete=False)
    with_milp = run_benchmark(folder, force=True)
    assert Counter(r["result"] for r in without)["unknown"] >= 1
    assert Counter(r["result"] for r in with_milp)["unknown"] == 0
    for before, after in zip(without, with_milp):
        if before["result"] != "unknown":  # decided ones keep their verdict
            assert after["result"] == before["result"]
        else:
            assert after["method"] == "milp" and after["result"] in ("sat", "unsat")
    shutil.rmtree(folder)
