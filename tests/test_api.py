"""The public Python API (docs/api.md): the documented example runs, registries are complete on import, plugins."""
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import abscert_bench as ab
from abscert_bench.data import load_dataset
from abscert_bench.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_METHODS = {"abscert", "natural", "ibp", "crown-ibp"}
BUILTIN_VERIFIERS = {"abscert-paper", "abscert-sound", "ibp", "crown", "alpha-crown", "pgd"}


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_docs_api_example_runs():
    """The first python block of docs/api.md, executed as written (its own asserts check the hull bounds contain
    the deployed outputs); then the objects it made are checked here."""
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(python_blocks(ROOT / "docs" / "api.md")[0], "docs/api.md", "exec"), namespace)
    trained, results, meta = namespace["trained"], namespace["results"], namespace["meta"]
    assert trained.abstraction == ab.Abstraction("point", 0.25, 0.05)
    assert len(namespace["epochs"]) == 4 and namespace["epochs"][-1]["train_acc"] > 0.5
    assert set(results) == {"abscert-paper", "abscert-sound"}
    sound = results["abscert-sound"]
    assert [r.index for r in sound] == list(range(8))
    for r in sound:
        assert r.status in ("verified", "falsified", "unknown") and r.time_s >= 0
        assert (r.counterexample is not None) == (r.status == "falsified")
        if r.counterexample is not None:  # a real counterexample: in the ball, misclassified by N(phi(x'))
            x_prime = torch.as_tensor(r.counterexample)[None]
            assert float((x_prime - namespace["x"][r.index]).abs().max()) <= 0.05 + 1e-6
            assert int(trained.classifier()(x_prime).argmax()) != r.label
    folder = Path(namespace["out"])
    assert (folder / "instances.csv").read_text().count("\n") == 2 * 2  # hull + deployed, two images
    assert meta["checks"]["vnnlib"] == "ok"
    assert set(meta["checks"]["onnx"]) == {"onnx/hull.onnx", "onnx/deployed.onnx", "onnx/network.onnx"}
    assert json.loads((folder / "benchmark.json").read_text())["abstraction"]["d"] == 0.25
    shutil.rmtree(folder.parent)  # the example's tempfile.mkdtemp()


def test_readme_api_example_runs(capsys):
    block = [b for b in python_blocks(ROOT / "README.md") if "import abscert_bench as ab" in b]
    assert len(block) == 1, "README lacks its Python API example"
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(block[0], "README.md", "exec"), namespace)
    assert set(namespace["results"]) == {"abscert-paper", "abscert-sound"}
    assert namespace["lower"].shape == (4, 10) and (namespace["lower"] <= namespace["upper"]).all()
    assert "abscert-sound" in capsys.readouterr().out


def test_fresh_interpreter_lists_every_builtin():
    """Registries are complete on import (also when a leaf module is imported first), without auto_LiRPA."""
    code = textwrap.dedent("""
        import json, sys
        from abscert_bench.training.methods import METHODS
        from abscert_bench.verification.base import VERIFIERS
        import abscert_bench as ab
        print(json.dumps({"methods": METHODS.names(), "verifiers": VERIFIERS.names(),
                          "registered": ab.registered(), "lirpa": "auto_LiRPA" in sys.modules}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    listed = json.loads(out.stdout.strip().splitlines()[-1])
    assert BUILTIN_METHODS <= set(listed["methods"])
    assert BUILTIN_VERIFIERS <= set(listed["verifiers"])
    assert listed["registered"]["methods"] == listed["methods"]
    assert {"dm_small", "fc3"} <= set(listed["registered"]["models"])
    assert "digits" in listed["registered"]["datasets"]
    assert listed["lirpa"] is False  # auto_LiRPA stays lazily imported


def test_import_abscert_bench_is_light():
    out = subprocess.run([sys.executable, "-c", "import sys, abscert_bench; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


# -- a plugin through entry points and `abscert-bench run SPEC` ------------------------------------------------------
PLUGIN = '''
import torch
from abscert_bench.verification import VERIFIERS, Verifier


class ToyMargin(Verifier):
    name = "toy-margin"
    meaning = "clean margin of the true class over the runner-up (not a robustness proof)"
    sound = False

    def verify_batch(self, trained, x, y, eps):
        with torch.no_grad():
            logits = trained.classifier()(x)
        top2 = logits.topk(2, dim=1).values
        return [("unknown", None, {"margin": float(row[label] - top[1])}) for row, top, label in zip(logits, top2, y)]


@VERIFIERS.register("toy-margin")
def toy_margin(**options):
    return ToyMargin()
'''

PLUGIN_SPEC = """
name = "plugin"
[grid]
datasets = ["digits"]
models = ["fc3"]
eps = [0.1]
[train]
epochs = 1
limit = 300
[methods.natural]
[verify]
verifiers = ["toy-margin", "pgd"]
limit = 5
"""


def install_plugin(root: Path) -> Path:
    """A toy plugin 'installed' the way pip does it: a module plus a dist-info with its entry point."""
    site = root / "site"
    (site / "toy_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "toy_abscert_plugin.py").write_text(PLUGIN)
    (site / "toy_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\n"
                                                                 "Version: 0.1\n")
    (site / "toy_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[abscert_bench.plugins]\ntoy = toy_abscert_plugin\n")
    return site


def test_plugin_verifier_runs_through_run_spec(tmp_path):
    site = install_plugin(tmp_path)
    spec = tmp_path / "spec.toml"
    spec.write_text(PLUGIN_SPEC)
    env = {**__import__("os").environ, "PYTHONPATH": f"{site}:{ROOT}:{ROOT / 'baselines'}"}
    cli = "from abscert_bench.cli import main; raise SystemExit(main())"
    listed = subprocess.run([sys.executable, "-c", "import abscert_bench as ab; print(ab.registered()['verifiers'])"],
                            capture_output=True, text=True, env=env, check=True)
    assert "toy-margin" in listed.stdout
    done = subprocess.run([sys.executable, "-c", cli, "run", str(spec), "--out", str(tmp_path / "store")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    cell = tmp_path / "store" / "cells" / "digits_fc3_eps0.1_natural_s0"
    stages = json.loads((cell / "result.json").read_text())["stages"]
    assert stages["verify:toy-margin"]["samples"] == 5 and stages["verify:toy-margin"]["unknown"] == 5
    rows = (cell / "run" / "verify" / "eps=0.1" / "toy-margin.csv").read_text().splitlines()
    assert rows[0].startswith("index,label,status") and "detail_margin" in rows[0] and len(rows) == 6
    # without the plugin on the path the same spec is refused, naming the key
    env["PYTHONPATH"] = f"{ROOT}:{ROOT / 'baselines'}"
    refused = subprocess.run([sys.executable, "-c", cli, "run", str(spec), "--out", str(tmp_path / "other")],
                             capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and "unknown verifier 'toy-margin'" in refused.stderr


def test_broken_plugin_is_skipped_with_a_warning(tmp_path):
    site = install_plugin(tmp_path)
    (site / "toy_abscert_plugin.py").write_text("raise ImportError('no such thing')\n")
    env = {**__import__("os").environ, "PYTHONPATH": f"{site}:{ROOT}:{ROOT / 'baselines'}"}
    out = subprocess.run([sys.executable, "-c", "import abscert_bench as ab; print(ab.registered()['verifiers'])"],
                         capture_output=True, text=True, env=env, check=True)
    assert "abscert-sound" in out.stdout and "toy-margin" not in out.stdout
    assert "plugin 'toy'" in out.stderr and "no such thing" in out.stderr


# -- the API on plain modules ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def small_net(channels: int = 2) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * 64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_decorator_registered_verifier_runs_through_verify(digits, monkeypatch):
    class Constant(ab.Verifier):
        name = "always-unknown"
        meaning = "nothing"

        def verify_batch(self, trained, x, y, eps):
            return [("unknown", None, {"seen": int(label)}) for label in y]

    monkeypatch.setattr(ab.VERIFIERS, "_items", dict(ab.VERIFIERS._items))  # registered for this test only
    ab.VERIFIERS.register("always-unknown")(lambda **options: Constant())
    net = small_net(1)
    results = ab.verify(net, digits.test_x[:3], digits.test_y[:3], 0.1, verifiers=["always-unknown", "pgd"])
    assert [r.details["seen"] for r in results["always-unknown"]] == digits.test_y[:3].tolist()
    assert len(results["pgd"]) == 3
    frame = ab.results_frame(results)
    assert list(frame["verifier"].unique()) == ["always-unknown", "pgd"] and len(frame) == 6


@pytest.mark.parametrize("method", ["ibp", "natural"])
def test_train_other_methods_on_a_loader(digits, method):
    loader = DataLoader(TensorDataset(digits.train_x[:256], digits.train_y[:256]), batch_size=64)
    steps: list = []
    trained = ab.train(small_net(1), loader, method, eps=0.05, epochs=2, warmup_epochs=0, ramp_epochs=1,
                       on_step=steps.append)
    assert trained.abstraction is None and trained.num_classes == 10
    assert [s["step"] for s in steps] == list(range(8))
    if method == "ibp":  # the eps schedule ramps over the first epoch, then holds the target
        assert steps[0]["eps"] < 0.05 and steps[-1]["eps"] == pytest.approx(0.05)
    bounded, box = ab.bounded_ball(trained.network, digits.test_x[:4], 0.05)
    lower, upper = bounded.compute_bounds(x=(box,), method="IBP")
    with torch.no_grad():
        clean = trained.network(digits.test_x[:4])
    assert (lower <= clean + 1e-5).all() and (clean <= upper + 1e-5).all()


def test_bounded_hull_of_a_plain_module_contains_every_reachable_output(digits):
    """Every reachable abstract input's logits (each pixel at its first or last reachable option) lie in the bounds."""
    torch.manual_seed(3)
    phi = ab.Abstraction("point", 0.25)
    net = small_net(2).eval()
    x = digits.test_x[:2]
    bounded, box = ab.bounded_hull(net, x, 0.1, abstraction=phi)
    lower, upper = bounded.compute_bounds(x=(box,), method="CROWN")
    choices = ab.reachable_choices(phi, x, 0.1)
    for sample in range(2):
        for _ in range(30):
            choice = (torch.rand(choices.count.shape[1]) * torch.as_tensor(choices.count[sample])).long().numpy()
            z = torch.as_tensor(choices.abstract(sample, choice))[None]
            with torch.no_grad():
                logits = net(z)[0]
            assert (lower[sample] <= logits + 1e-5).all() and (logits <= upper[sample] + 1e-5).all()
            concrete = torch.as_tensor(choices.concrete(sample, choice))[None]
            assert torch.equal(phi(concrete), z)  # the concrete image realises the abstract input


def test_api_errors_are_user_errors(digits):
    net = small_net(2)
    x, y = digits.test_x[:2], digits.test_y[:2]
    with pytest.raises(UserError, match="abstraction="):
        ab.bounded_hull(net, x, 0.1)
    with pytest.raises(UserError, match="does not apply"):
        ab.verify(small_net(1), x, y, 0.1, verifiers=["abscert-sound"])
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        ab.verify(net, x * 2, y, 0.1, abstraction=ab.Abstraction("point", 0.25))
    with pytest.raises(UserError, match="labels"):
        ab.verify(net, x, y[:1], 0.1, abstraction=ab.Abstraction("point", 0.25))
    with pytest.raises(UserError, match="unknown training method"):
        ab.train(net, [(x, y)], "abscertt", eps=0.1)
    with pytest.raises(UserError, match="not run"):
        ab.verify(net, x, y, 0.1, abstraction=ab.Abstraction("point", 0.25), options={"crown": {}})
