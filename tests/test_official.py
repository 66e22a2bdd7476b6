"""AbsCert as published: units, cell count, candidates (main.py generate_d), protocols, soundness (Normalize in N)."""
from __future__ import annotations

import csv
import itertools
import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from abscert_bench.abstraction import Abstraction, cell_index, cell_lower, cell_upper, check_granularity, num_cells
from abscert_bench.errors import UserError
from abscert_bench.models.registry import Normalize
from abscert_bench.official import (
    generate_d,
    official_candidates,
    official_cell_bounds,
    official_cell_count,
    official_cell_exact,
    paper_eps,
    pixel_eps,
    pixel_granularity,
    recipe_for,
)
from abscert_bench.sound.bounds import HullBounder
from abscert_bench.trained import TrainedModel, load_checkpoint
from abscert_bench.training import create_method
from abscert_bench.training.loop import TrainConfig, evaluate, protocol_config, run_training
from abscert_bench.training.methods import augment_official
from abscert_bench.verification import create_verifier

LEVELS = np.arange(256)


pytestmark = pytest.mark.usefixtures("one_thread")


# -- candidates and cell count: main.py generate_d, `interval_num = 2 // d` -------------------------------------------
EXPECTED = {  # paper eps → (candidate d as 2/i, official cell counts 2 // d), worked out by hand from the rule
    0.3: ([2 / 2, 2 / 3], [2, 3]),
    0.2: ([2 / 2, 2 / 3, 2 / 4, 2 / 5], [2, 3, 4, 4]),
    0.1: ([2 / i for i in range(2, 11)], [2, 3, 4, 4, 6, 7, 8, 9, 9]),
    # below 2/10 the walk keeps 2/i only d_step = 0.01 apart: 2/17 is skipped (2/16 - 2/17 < 0.01)
    0.05: ([2 / i for i in (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 18, 20)],
           [2, 3, 4, 4, 6, 7, 8, 9, 9, 10, 12, 12, 14, 16, 18, 19]),
}


@pytest.mark.parametrize("eps", sorted(EXPECTED))
def test_generate_d_matches_the_official_rule(eps):
    d_list, thresholds = generate_d([eps])
    expected_d, expected_k = EXPECTED[eps]
    assert d_list == pytest.approx(expected_d, abs=1e-15)
    assert [official_cell_count(d) for d in d_list] == expected_k
    assert thresholds == [pytest.approx(2 / int(1 / eps))]
    assert all(d >= 2 * eps - 1e-12 for d in d_list)  # d >= 2·eps on [-1, 1]
    # our candidates: one per distinct K, pixel d = 1/K, each cell at least 2·(pixel eps) wide
    candidates = official_candidates(pixel_eps(eps))
    assert [c.cells for c in candidates] == sorted(set(expected_k))
    for c in candidates:
        assert c.pixel_d == 1 / c.cells and c.pixel_d >= 2 * pixel_eps(eps) - 1e-12
        assert all(official_cell_count(d) == c.cells for d in c.paper_d)
        assert num_cells(check_granularity(c.pixel_d)) == c.cells


def test_float_floor_cell_count_and_readme_eta():
    assert 2 // 0.2 == 9.0 and official_cell_count(0.2) == 9 and pixel_granularity(0.2) == 1 / 9
    assert official_cell_count(0.4) == 4 == official_cell_count(0.5)
    # the README's η for eps 0.1 are real cell widths 2/K: 0.222 = 2/9, 0.285 = 2/7
    assert round(2 / official_cell_count(2 / 9), 3) == 0.222 and int(2 / official_cell_count(2 / 7) * 1000) == 285


def test_generate_d_on_several_eps_and_larger_step():
    d_list, thresholds = generate_d([0.1, 0.2, 0.3, 0.4])  # config/mnist_*.json: one walk for all eps
    assert d_list == pytest.approx(EXPECTED[0.1][0])
    assert thresholds == pytest.approx([1.0, 2 / 3, 0.4, 0.2])
    coarse, _ = generate_d([0.05], d_step=0.1)
    assert all(a - b >= 0.1 - 1e-12 for a, b in zip(coarse, coarse[1:]) if b != 0.1)
    with pytest.raises(UserError):
        official_candidates(0.0)


# -- units: paper eps → pixel eps → the official cells ---------------------------------------------------------------
def official_float32(levels: np.ndarray, cells: int) -> torch.Tensor:
    """The official pipeline as it runs: ToTensor (/255), Normalize(0.5, 0.5), abstract_data's floor division."""
    x = torch.from_numpy(levels.astype(np.uint8)).float().div(255)
    x = (x - 0.5) / 0.5
    step = 2 / float(cells)
    k = torch.div(x + 1, step, rounding_mode="floor")
    lower = torch.clamp(-1 + k * step, -1, 1)
    upper = torch.clamp(lower + step, -1, 1)
    lower = torch.clamp(lower - step * torch.eq(lower, upper).int(), min=-1)
    return torch.round((lower.double() + 1) / step).long()


@pytest.mark.parametrize("eps", sorted(EXPECTED))
def test_unit_round_trip_gives_the_official_cells(eps):
    pixel = pixel_eps(eps)
    assert paper_eps(pixel) == pytest.approx(eps) and pixel == eps / 2
    for candidate in official_candidates(pixel):
        k = candidate.cells
        ours = cell_index(torch.from_numpy(LEVELS / 255.0).float(), candidate.pixel_d).numpy()
        exact = np.array([official_cell_exact(int(v), k) for v in LEVELS])
        assert np.array_equal(ours, exact), k  # all 256 levels, edges and 255 included
        # the cell ends, mapped to [-1, 1] by the model's Normalize(0.5, 0.5), are the official ones
        lo = cell_lower(torch.from_numpy(ours), candidate.pixel_d)
        up = cell_upper(torch.from_numpy(ours), candidate.pixel_d)
        bounds = [official_cell_bounds(int(v), k) for v in LEVELS]
        assert np.allclose((lo.double() - 0.5) / 0.5, [float(b[0]) for b in bounds], atol=1e-6)
        assert np.allclose((up.double() - 0.5) / 0.5, [float(b[1]) for b in bounds], atol=1e-6)
        # the official float32 pipeline agrees except, for some K, on levels exactly on an edge
        floats = official_float32(LEVELS, k).numpy()
        differ = LEVELS[floats != exact]
        assert all((Fraction(int(v) * k, 255).denominator == 1) for v in differ), (k, differ)


def test_official_float32_agrees_everywhere_for_the_mnist_candidates():
    for k in (2, 3, 4, 6, 7, 8, 9):  # every K the paper's MNIST eps (0.1 … 0.4) can choose
        assert np.array_equal(official_float32(LEVELS, k).numpy(), cell_index(torch.from_numpy(LEVELS / 255.0).float(),
                                                                               1 / k).numpy())
    # K = 15 (CIFAR's paper eps 2/255): the float32 pipeline puts levels 17, 34, … (exact edges) one cell lower
    assert not np.array_equal(official_float32(LEVELS, 15).numpy(),
                              np.array([official_cell_exact(int(v), 15) for v in LEVELS]))


# -- the method and the recipe --------------------------------------------------------------------------------------
def test_method_options():
    official = create_method("abscert", 0.05, protocol="official")
    assert official.describe()["protocol"] == "official" and official.abstraction().d == 1 / 9
    with pytest.raises(UserError, match="chooses d itself"):
        create_method("abscert", 0.05, protocol="official", d=0.2)
    with pytest.raises(UserError, match="protocol"):
        create_method("abscert", 0.05, protocol="paper")
    with pytest.raises(UserError, match="recipe"):
        create_method("abscert", 0.05, recipe="given")
    with pytest.raises(UserError, match="point"):
        create_method("abscert", 0.05, protocol="clean", variant="region")
    assert create_method("abscert", 0.05).describe() == {"name": "abscert", "d": 0.2, "variant": "point"}


def test_recipe_table_and_weight_decay():
    assert recipe_for("mnist", "dm_small")["lr"] == 1e-3 and recipe_for("mnist", "dm_small")["batch_size"] == 256
    assert recipe_for("mnist", "fc3")["lr"] == 0.01 and recipe_for("digits", "fc5")["batch_size"] == 128
    cifar = recipe_for("cifar10", "dm_large")
    assert (cifar["lr"], cifar["batch_size"], cifar["epochs"], cifar["augment"]) == (3e-3, 128, 30, True)
    config = protocol_config(TrainConfig("mnist", "dm_small", "abscert", 0.05), recipe_for("mnist", "dm_small"))
    assert (config.lr_schedule, config.lr_warmup_epochs, config.epochs) == ("cosine", 1.0, 10)
    method = create_method("abscert", 0.05, protocol="official").configure(recipe_for("mnist", "fc3"), 1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
    loss, _ = method.loss_from_input(net, x, y)
    plain = nn.functional.cross_entropy(net(x), y)
    l2 = sum(float(p.pow(2).sum()) for p in net.parameters())
    assert float(loss) == pytest.approx(float(plain) + 0.5 * 2e-4 * l2, rel=1e-6)


def test_cifar_augmentation_stays_in_range():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 32, 32)
    out = augment_official(x)
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert (out == 0.5).float().mean() > 0.01  # erased and padded pixels are 0 on [-1, 1]


# -- training: official (test selection) and clean (validation selection) ----------------------------------------------
@pytest.fixture(scope="module")
def protocol_runs(tmp_path_factory):
    from abscert_bench.data import load_dataset

    digits = load_dataset("digits")
    root = tmp_path_factory.mktemp("protocol")
    runs = {}
    for protocol in ("official", "clean"):
        run_dir = root / protocol
        run_dir.mkdir()
        config = TrainConfig("digits", "fc3", "abscert", 0.05, epochs=2,
                             method_options={"protocol": protocol, "recipe": "given"})
        run_training(config, digits, run_dir)
        runs[protocol] = run_dir
    return digits, runs


def _rows(path):
    return list(csv.DictReader(path.open()))


@pytest.mark.parametrize("protocol,selection", [("official", "test"), ("clean", "validation")])
def test_protocol_run_selects_the_argmax(protocol_runs, protocol, selection):
    digits, runs = protocol_runs
    run_dir = runs[protocol]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["protocol"] == protocol and config["selection"] == selection and config["paper_eps"] == 0.1
    rows = _rows(run_dir / "granularity_search.csv")
    assert [int(r["cells"]) for r in rows] == [c.cells for c in official_candidates(0.05)]
    accuracies = [float(r["selection_accuracy"]) for r in rows]
    chosen = [r for r in rows if r["chosen"] == "1"]
    assert len(chosen) == 1 and chosen[0] is rows[accuracies.index(max(accuracies))]
    assert all(r["selection"] == selection for r in rows)
    assert config["cells"] == int(chosen[0]["cells"]) and config["method_options"]["d"] == 1 / config["cells"]
    # the kept epoch is the argmax of the selection split's accuracy
    metrics = _rows(run_dir / "metrics.csv")
    split = "test_acc" if protocol == "official" else "val_acc"
    per_epoch = [float(m[split]) for m in metrics]
    selected = [i for i, m in enumerate(metrics) if m["selected"] == "1"]
    assert selected == [per_epoch.index(max(per_epoch))] and int(chosen[0]["best_epoch"]) == selected[0] + 1
    # the deployed classifier (reloaded) is that epoch's network, with the fixed [-1, 1] normalisation inside N
    trained = load_checkpoint(run_dir)
    assert isinstance(trained.network[0], Normalize) and trained.abstraction.d == 1 / config["cells"]
    assert torch.all(trained.network[0].mean == 0.5) and trained.network[0].mean.numel() == 2
    accuracy = evaluate(trained.classifier(), digits.test_x, digits.test_y)
    assert accuracy == pytest.approx(float(metrics[selected[0]]["test_acc"]))
    if protocol == "official":
        assert accuracy == pytest.approx(max(accuracies))


def brute_force_cells(trained: TrainedModel, x: torch.Tensor, y: int, eps: float) -> bool | None:
    """Exact answer by enumerating every reachable cell combination (None when there are too many)."""
    d = trained.abstraction.d
    flat = x.reshape(-1).double()
    first = cell_index((flat - eps).clamp(0, 1), d)
    last = cell_index((flat + eps).clamp(0, 1), d)
    choices = [list(range(int(a), int(b) + 1)) for a, b in zip(first, last)]
    if np.prod([len(c) for c in choices], dtype=np.float64) > 8192:
        return None
    combos = torch.tensor(list(itertools.product(*choices)))
    z = torch.cat([cell_lower(combos, d), cell_upper(combos, d)], dim=1).view(-1, 2 * x.shape[0], *x.shape[1:])
    with torch.no_grad():
        return bool((trained.network(z).argmax(1) == y).all())


def test_official_deployed_classifier_is_verified_soundly(protocol_runs):
    digits, runs = protocol_runs
    trained = load_checkpoint(runs["official"])
    assert HullBounder(trained).folded is False  # Normalize first: the explicit gap pre-map, exact
    x, y = digits.test_x[:40], digits.test_y[:40]
    results = create_verifier("abscert-sound", timeout=5.0).verify(trained, x, y, 0.05)
    checked = 0
    for i, result in enumerate(results):
        truth = brute_force_cells(trained, x[i], int(y[i]), 0.05)
        if truth is None:
            continue
        checked += 1
        if result.status == "verified":
            assert truth, i
        elif result.status == "falsified":
            assert not truth, i
    assert checked >= 10 and {r.status for r in results} >= {"verified"}


# -- a tiny net with Normalize inside N: exact agreement with brute force (conv zero padding, not folded) -------------
SHAPE = (1, 3, 3)


def tiny(seed: int, kind: str, d: float) -> TrainedModel:
    torch.manual_seed(seed)
    c, h, w = SHAPE
    if kind == "conv":
        body = nn.Sequential(nn.Conv2d(2 * c, 4, 2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3))
    else:
        body = nn.Sequential(nn.Flatten(), nn.Linear(2 * c * h * w, 12), nn.ReLU(), nn.Linear(12, 3))
    with torch.no_grad():
        for p in body.parameters():
            p.mul_(3.0)
    net = nn.Sequential(Normalize([0.5] * 2 * c, [0.5] * 2 * c), body).eval()
    abstraction = Abstraction("point", d)
    config = {"model": "tiny", "input_shape": list(SHAPE), "num_classes": 3, "activation": "relu",
              "abstraction": abstraction.to_dict(), "normalize": [[0.5] * 2 * c, [0.5] * 2 * c]}
    return TrainedModel(net, config, abstraction)


def safe_images(d: float, eps: float, n: int, rng) -> torch.Tensor:
    """Images whose ball ends stay 1e-4 away from every cell edge (brute force on cells is then exact)."""
    edges = np.arange(1, num_cells(d)) * d
    values = []
    while len(values) < n * 9:
        v = rng.random()
        if np.min(np.abs(np.array([v - eps, v + eps])[:, None] - edges[None, :])) > 1e-4:
            values.append(v)
    return torch.tensor(values, dtype=torch.float32).view(n, *SHAPE)


@pytest.mark.parametrize("kind,d,eps", [("conv", 1 / 9, 0.05), ("conv", 1 / 4, 0.1), ("fc", 1 / 6, 0.08)])
def test_normalize_inside_n_agrees_with_brute_force(kind, d, eps):
    seen = set()
    for seed in range(3):
        trained = tiny(seed, kind, d)
        assert HullBounder(trained).folded is False
        x = safe_images(d, eps, 6, np.random.default_rng(seed))
        with torch.no_grad():
            y = trained.classifier()(x).argmax(1)
        truth = [brute_force_cells(trained, x[i], int(y[i]), eps) for i in range(len(x))]
        for options in ({}, {"enumerate_limit": 0, "attack": False}):
            results = create_verifier("abscert-sound", **options).verify(trained, x, y, eps)
            for i, result in enumerate(results):
                assert result.status == ("verified" if truth[i] else "falsified"), (seed, options, i, result.details)
                seen.add(result.status)
    assert seen == {"verified", "falsified"}


def test_export_and_run_back_with_normalize(tmp_path):
    """A conv N with the [-1, 1] Normalize inside: the VNN-COMP export passes its own checks (onnxruntime = torch),
    the run-back bounds it (Normalize is exported as the equal 1×1 Conv), and no unsat meets a sound falsification."""
    from dataclasses import replace

    from abscert_bench.data import load_dataset
    from abscert_bench.vnncomp import export_benchmark, run_benchmark
    from abscert_bench.vnncomp.onnx_export import export_form

    digits = load_dataset("digits")
    small = replace(digits, train_x=digits.train_x[:300], train_y=digits.train_y[:300])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = TrainConfig("digits", "dm_small", "abscert", 0.1, epochs=1,
                         method_options={"protocol": "official", "recipe": "given"})
    trained = run_training(config, small, run_dir)
    x = torch.rand(64, 2, 8, 8)
    with torch.no_grad():
        assert torch.equal(export_form(trained.network)(x), trained.network(x))  # bit for bit
    meta = export_benchmark(run_dir, tmp_path / "bench", 3, 0, 10)
    rows = run_benchmark(tmp_path / "bench")
    assert len(rows) == len(meta["instances"]) and {r["result"] for r in rows} <= {"sat", "unsat", "unknown"}
    sound = create_verifier("abscert-sound", timeout=5.0)
    for row in rows:
        index, label = int(row["index"]), int(row["label"])
        status = sound.verify(trained, digits.test_x[index][None], torch.tensor([label]), 0.1)[0].status
        assert not (row["result"] == "unsat" and status == "falsified"), row
        assert not (row["result"] == "sat" and status == "verified"), row


# -- tables, CLI, spec -------------------------------------------------------------------------------------------------
def test_tables_show_both_units_and_the_test_selection_mark(protocol_runs):
    from abscert_bench.harness.tables import collect, rows_frame, runs_markdown, to_latex
    from abscert_bench.harness.tables import to_markdown as harness_markdown

    _, runs = protocol_runs
    rows = collect([runs["official"].parent])
    text = runs_markdown(rows)
    official = next(line for line in text.splitlines() if "(official," in line)
    clean = next(line for line in text.splitlines() if "(clean," in line)
    assert "| 0.05 (paper 0.1) |" in official and "†" in official and "†" not in clean
    assert "| 0.05 (paper 0.1) |" in clean and "selected on the test set" in text
    frame = rows_frame(rows)
    assert list(frame.columns[:7]) == ["dataset", "model", "eps", "paper_eps", "protocol", "selection", "method"]
    assert set(frame["selection"]) == {"test", "validation"}
    labelled = [{**r, "label": r["method"], "seed": 0} for r in rows]
    assert "0.05 (paper 0.1)" in harness_markdown(labelled) and "†" in harness_markdown(labelled)
    assert r"$^\dagger$" in to_latex(labelled) and "0.05 (paper 0.1)" in to_latex(labelled)


def test_pixel_rows_unchanged(runs):
    from abscert_bench.harness.tables import collect, rows_frame, runs_markdown

    rows = collect([runs["abscert"]])
    assert "protocol" not in rows[0] and "paper_eps" not in rows[0]
    assert "paper" not in runs_markdown(rows).split("\n")[2] and "†" not in runs_markdown(rows)
    assert "paper_eps" not in rows_frame(rows).columns


def test_spec_accepts_official_without_d_and_refuses_d():
    from abscert_bench.harness.spec import parse_spec

    base = {"grid": {"datasets": ["digits"], "models": ["fc3"], "eps": [0.05, 0.1]},
            "methods": {"abscert-official": {"method": "abscert", "protocol": "official"},
                        "abscert": {"d": [0.2, 0.25]}}}
    spec = parse_spec(base)
    official = [c for c in spec.cells if c["entry"] == "abscert-official"]
    assert len(official) == 2 and "d" not in official[0]["method_options"]
    bad = {**base, "methods": {"x": {"method": "abscert", "protocol": "official", "d": 0.2}}}
    with pytest.raises(UserError, match="generates its own granularity"):
        parse_spec(bad)
    with pytest.raises(UserError, match="protocol"):
        parse_spec({**base, "methods": {"x": {"method": "abscert", "protocol": "paper"}}})


def test_cli_protocol(tmp_path, capsys):
    from abscert_bench.cli import main

    assert main(["train", "--dataset", "digits", "--model", "fc3", "--protocol", "official", "--d", "0.2",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "chooses d itself" in capsys.readouterr().err
    assert main(["train", "--dataset", "digits", "--model", "fc3", "--protocol", "clean", "--recipe", "given",
                 "--epochs", "1", "--eps", "0.15", "--out", str(tmp_path / "clean")]) == 0
    config = json.loads((tmp_path / "clean" / "config.json").read_text())
    assert config["selection"] == "validation" and config["paper_eps"] == pytest.approx(0.3)
