"""One loop, pluggable methods: each method trains, writes a reloadable run directory, and uses its input."""
import csv
import json

import pytest
import torch

from abscert_bench.errors import UserError
from abscert_bench.trained import load_checkpoint, save_checkpoint
from abscert_bench.training import create_method
from abscert_bench.training.loop import TrainConfig, evaluate, granularity_search, train_model
from abscert_bench.training.schedule import Schedule


def test_run_directory_contents(runs):
    for method, run_dir in runs.items():
        config = json.loads((run_dir / "config.json").read_text())
        assert config["method"] == method
        rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
        assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
        assert all(float(r["train_time_s"]) > 0 for r in rows)
        # the eps column is the training eps of bound-based methods only (AbsCert and natural ignore it)
        assert all((r["eps"] != "") == (method in ("ibp", "crown-ibp")) for r in rows)
        assert (run_dir / "checkpoint.pt").exists()


def test_checkpoint_reloads_to_the_same_function(runs, digits):
    for run_dir in runs.values():
        trained = load_checkpoint(run_dir)
        acc = evaluate(trained.classifier(), digits.test_x, digits.test_y)
        recorded = list(csv.DictReader((run_dir / "metrics.csv").open()))[-1]["test_acc"]
        assert acc == pytest.approx(float(recorded))


def test_natural_and_abscert_learn(runs, digits):
    for method in ("natural", "abscert"):
        trained = load_checkpoint(runs[method])
        assert evaluate(trained.classifier(), digits.test_x, digits.test_y) > 0.6


def test_abscert_network_sees_abstract_inputs(runs):
    trained = load_checkpoint(runs["abscert"])
    assert trained.abstraction is not None and trained.abstraction.d == 0.2
    first = next(m for m in trained.network.modules() if isinstance(m, torch.nn.Linear))
    assert first.in_features == 2 * 64  # 2C channels of 8×8
    standard = load_checkpoint(runs["natural"])
    assert standard.abstraction is None


def test_abscert_output_depends_only_on_cells(runs):
    trained = load_checkpoint(runs["abscert"])
    x = torch.full((1, 1, 8, 8), 0.21)
    same_cells = torch.full((1, 1, 8, 8), 0.39)
    f = trained.classifier()
    assert torch.equal(f(x), f(same_cells))


def test_bound_methods_improve_worst_case_loss(digits):
    """After IBP training at eps, the IBP robust loss is lower than for the same net trained naturally."""
    from abscert_bench.lirpa import bounded_module, margin_lower_bounds

    x, y = digits.train_x[:512], digits.train_y[:512]
    margins = {}
    for method in ("natural", "ibp"):
        config = TrainConfig("digits", "fc3", method, 0.05, epochs=4, warmup_epochs=0, ramp_epochs=2)
        trained, _ = train_model(config, create_method(method, 0.05), x, y, x[:64], y[:64], 10)
        bounded = bounded_module(trained.network, x[:64])
        lb = margin_lower_bounds(bounded, (x[:64] - 0.05).clamp(0, 1), (x[:64] + 0.05).clamp(0, 1),
                                 y[:64], 10, "ibp")
        margins[method] = float(lb.min(1).values.mean())
    assert margins["ibp"] > margins["natural"]


def test_schedule_ramp_and_mixing():
    s = Schedule(eps=0.3, total_steps=100, warmup_steps=10, ramp_steps=20, kappa_end=0.5)
    assert s.eps_at(0) == 0 and s.eps_at(9) == 0
    assert 0 < s.eps_at(15) < 0.3 and s.eps_at(29) == pytest.approx(0.3) and s.eps_at(99) == 0.3
    assert s.kappa_at(0) == 1 and s.kappa_at(50) == 0.5
    assert s.beta_at(0) == 1 and s.beta_at(50) == 0


def test_granularity_search_picks_a_listed_d(digits):
    config = TrainConfig("digits", "fc3", "abscert", 0.05, epochs=1, method_options={"variant": "point"})
    best, rows = granularity_search(config, digits, [0.1, 0.25])
    assert best in (0.1, 0.25)
    assert {r["d"] for r in rows} == {0.1, 0.25}
    assert max(r["validation_paper_accuracy"] for r in rows) == next(
        r["validation_paper_accuracy"] for r in rows if r["d"] == best)


def test_granularity_search_refuses_d_below_2eps(digits):
    config = TrainConfig("digits", "fc3", "abscert", 0.1, epochs=1)
    with pytest.raises(UserError, match="2\\*eps"):
        granularity_search(config, digits, [0.1, 0.3])


def test_region_variant_trains(digits):
    config = TrainConfig("digits", "fc3", "abscert", 0.1, epochs=1, method_options={"d": 0.2, "variant": "region"})
    method = create_method("abscert", 0.1, d=0.2, variant="region")
    trained, metrics = train_model(config, method, digits.train_x, digits.train_y, digits.test_x, digits.test_y, 10)
    assert trained.abstraction.variant == "region" and trained.abstraction.eps == 0.1
    assert len(metrics) == 1


def test_unknown_method_and_options():
    with pytest.raises(UserError, match="crown-ibp"):
        create_method("madry", 0.1)
    with pytest.raises(UserError, match="options"):
        create_method("abscert", 0.1, gamma=3)
    with pytest.raises(UserError, match="unknown ibp options: d; valid: init"):
        create_method("ibp", 0.1, d=0.2)


def test_corrupt_and_nan_checkpoints(runs, tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(bad)
    trained = load_checkpoint(runs["natural"])
    next(trained.network.parameters()).data[0] = float("nan")
    save_checkpoint(trained, bad)
    with pytest.raises(UserError, match="NaN"):
        load_checkpoint(bad)


def test_grad_norm_clips_every_step(digits):
    """With a tiny gradient-norm cap the weights barely move; without it they move far; negative caps are refused."""
    x, y = digits.train_x[:256], digits.train_y[:256]

    def trained_weights(**options):
        config = TrainConfig("digits", "fc3", "natural", 0.1, epochs=1, batch_size=64, **options)
        config.validate()
        trained, _ = train_model(config, create_method("natural", 0.1), x, y, x, y, 10)
        return [p.detach() for p in trained.network.parameters()]

    initial = trained_weights(lr=1e-30)  # same seed, same initialisation, no movement

    def moved(weights):
        return sum(float((w - w0).norm()) for w, w0 in zip(weights, initial))

    # A clipped gradient of norm 1e-12 is far below Adam's eps (1e-8), so each update shrinks ~1e4-fold.
    assert moved(trained_weights(grad_norm=1e-12)) < 0.1 * moved(trained_weights(grad_norm=0.0))
    with pytest.raises(UserError, match="grad_norm"):
        TrainConfig("digits", "fc3", "natural", 0.1, grad_norm=-1.0).validate()
