"""AbsCert training against the reachable abstract inputs (issue 14): abscert-adv, abscert-random, abscert-ibp."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from abscert_bench.errors import UserError
from abscert_bench.lirpa import margin_lower_bounds
from abscert_bench.sound.attack import abstract_batch, margins_of, search_choices
from abscert_bench.sound.choices import reachable_options
from abscert_bench.training import create_method
from abscert_bench.training.schedule import Schedule

EPS = 0.1
RAMPED = Schedule(eps=EPS, total_steps=10)  # no warm-up, no ramp: the full eps and mix from step 0


def tiny_net(seed: int = 0, channels: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2 * channels, 4, 2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 8), nn.ReLU(),
                         nn.Linear(8, 3))


def images(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 3, 3, generator=g)
    x[:, :, 0, 0] = 0.19  # a pixel next to the edge at 0.2 (two reachable cells at eps 0.1)
    return x, torch.randint(0, 3, (n,), generator=g)


def enumerate_reachable(method, x: torch.Tensor) -> list[torch.Tensor]:
    """Every reachable abstract input of each image (the products of its pixels' options)."""
    options = reachable_options(method.abstraction(), x, EPS)
    out = []
    for i in range(len(x)):
        ranges = [range(int(c)) for c in options.count[i]]
        choices = np.array(list(itertools.product(*ranges)), dtype=np.int64)
        out.append(abstract_batch(options, np.full(len(choices), i), choices))
    return out


@pytest.mark.parametrize("d", [0.2, 0.3])  # d divides 1 (folded first layer) and not (clipped last cell)
def test_adversarial_loss_is_at_least_the_clean_loss(d):
    method = create_method("abscert-adv", EPS, d=d, mix=1.0, attack_restarts=1)
    x, y = images()
    network = tiny_net()
    clean, _ = method.loss_from_input(network, method.network_input(x), y)
    adversarial, logits = method.loss(network, x, y, RAMPED, 0)
    assert float(adversarial) >= float(clean) - 1e-6
    assert torch.allclose(logits, network(method.network_input(x)), atol=1e-5)
    # the search's worst input is reachable and no better than the clean one for the margin
    options = reachable_options(method.abstraction(), x, EPS)
    samples = np.arange(len(x))
    _, worst, margin = search_choices(network, options, samples, y, steps=2, restarts=1, stop_on_hit=False)
    assert ((worst >= 0) & (worst < options.count)).all()
    recomputed = margins_of(network, abstract_batch(options, samples, worst), y).detach().double().numpy()
    np.testing.assert_allclose(margin, recomputed, atol=1e-5)
    clean_margin = margins_of(network, method.network_input(x), y).detach().double().numpy()
    assert (margin <= clean_margin + 1e-6).all()


def test_adversarial_weight_follows_the_schedule():
    method = create_method("abscert-adv", EPS, mix=1.0)
    x, y = images()
    network = tiny_net()
    clean, _ = method.loss_from_input(network, method.network_input(x), y)
    warming = Schedule(eps=EPS, total_steps=10, warmup_steps=5, ramp_steps=5)
    assert float(method.loss(network, x, y, warming, 0)[0]) == pytest.approx(float(clean))  # warm-up: clean loss


@pytest.mark.parametrize("variant,d", [("point", 0.2), ("point", 0.3), ("region", 0.2)])
def test_hull_bound_lower_bounds_every_reachable_margin(variant, d):
    method = create_method("abscert-ibp", EPS, d=d, variant=variant)
    x, y = images()
    network = tiny_net(seed=3)
    method.prepare(network, method.network_input(x[:1]))
    network.eval()
    lower, upper = method.input_box(x, EPS)
    bounds = margin_lower_bounds(method.bounded, lower, upper, y, 3, "ibp")
    crown = margin_lower_bounds(method.bounded, lower, upper, y, 3, "crown")
    reachable = enumerate_reachable(method, x)
    assert max(len(r) for r in reachable) > 1  # the near-edge pixel really has two cells
    for i, inputs in enumerate(reachable):
        logits = network(inputs)
        others = [j for j in range(3) if j != int(y[i])]
        margins = logits[:, int(y[i])][:, None] - logits[:, others]
        assert (margins >= bounds[i] - 1e-5).all()
        assert (margins >= crown[i] - 1e-5).all()
        # the box (gap form for the point variant) holds every reachable input
        if variant == "point":
            half = inputs.shape[1] // 2
            coords = torch.cat([inputs[:, :half], inputs[:, half:] - inputs[:, :half]], 1)
        else:
            coords = inputs
        assert (coords >= lower[i] - 1e-6).all() and (coords <= upper[i] + 1e-6).all()


@pytest.mark.parametrize("name,options", [("abscert-adv", {"mix": 1.0}), ("abscert-random", {"mix": 1.0}),
                                          ("abscert-ibp", {}), ("abscert-crown-ibp", {})])
def test_a_few_steps_lower_the_loss(name, options):
    method = create_method(name, EPS, **options)
    x, y = images(n=16)
    torch.manual_seed(0)
    network = tiny_net(seed=5)
    method.prepare(network, method.network_input(x[:1]))
    optimizer = torch.optim.Adam(network.parameters(), lr=0.02)
    losses = []
    for step in range(80):
        torch.manual_seed(step)  # the same random draws for abscert-random's first and last loss
        loss, _ = method.loss(network, x, y, RAMPED, 5)
        losses.append(float(loss))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.manual_seed(0)  # the first step's random draws again
    final = float(method.loss(network, x, y, RAMPED, 5)[0])
    assert final < 0.9 * losses[0]


def test_defaults_and_bad_options():
    assert create_method("abscert-adv", 0.3).abstraction().d == pytest.approx(0.6)  # d = 2·eps by default
    assert create_method("abscert-ibp", 0.1).abstraction().d == pytest.approx(0.2)
    assert create_method("abscert-random", 0.0).abstraction().d == pytest.approx(0.2)
    for name, options in [("abscert-adv", {"mix": 1.5}), ("abscert-adv", {"attack_steps": 0}),
                          ("abscert-random", {"mix": "x"}), ("abscert-ibp", {"variant": "cube"}),
                          ("abscert-ibp", {"attack_steps": 1}), ("abscert-random", {"restarts": 2})]:
        with pytest.raises(UserError):
            create_method(name, 0.1, **options)


def test_cli_trains_with_method_options_and_refuses_bad_ones(tmp_path, capsys):
    import json

    from abscert_bench.cli import main

    run = tmp_path / "run"
    assert main(["train", "--method", "abscert-random", "--model", "fc3", "--epochs", "2", "--eps", "0.1",
                 "--method-option", "mix=0.9", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "abscert-random" and config["method_options"]["mix"] == 0.9
    assert "d" not in config["method_options"]  # the method's own default, 2·eps
    capsys.readouterr()
    for bad, fragment in ((["--method-option", "mix"], "KEY=VALUE"), (["--method-option", "mx=1"], "unknown"),
                          (["--method-option", "mix=2"], "mix must be in [0, 1]")):
        code = main(["train", "--method", "abscert-adv", "--model", "fc3", "--epochs", "1", *bad,
                     "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert code == 2 and fragment in err and err.count("abscert-bench: error") == 1
        assert not (tmp_path / "bad").exists()


def test_granularity_search_selects_by_sound_accuracy(tmp_path):
    from abscert_bench.data import load_dataset
    from abscert_bench.training.config import TrainConfig
    from abscert_bench.training.loop import run_training

    dataset = load_dataset("digits")
    config = TrainConfig(dataset="digits", model="fc3", method="abscert-random", eps=0.1, epochs=2,
                         method_options={"d": [0.2, 0.5]})
    trained = run_training(config, dataset, tmp_path)
    rows = (tmp_path / "granularity_search.csv").read_text().splitlines()
    assert rows[0].split(",") == ["d", "validation_paper_accuracy", "validation_sound_accuracy"]
    keys = {float(r.split(",")[0]): (float(r.split(",")[2]), float(r.split(",")[1])) for r in rows[1:]}
    assert trained.abstraction.d == max(keys, key=lambda d: (*keys[d], d))  # sound first, then the paper check


@pytest.mark.parametrize("method", ["abscert-adv", "abscert-ibp"])
def test_api_trains_and_verifies_the_deployed_classifier(method):
    """Through the public API: any user module, a list of batches; the result is an AbsCert model abscert-sound
    verifies (and the paper check applies to), like abscert's."""
    import abscert_bench as ab
    from abscert_bench.data import load_dataset

    data = load_dataset("digits")
    batches = [(data.train_x[i:i + 64], data.train_y[i:i + 64]) for i in range(0, 512, 64)]
    module = nn.Sequential(nn.Flatten(), nn.Linear(2 * 64, 32), nn.ReLU(), nn.Linear(32, 10))
    trained = ab.train(module, batches, method, eps=0.1, epochs=2, ramp_epochs=1, mix=1.0) if method == "abscert-adv" \
        else ab.train(module, batches, method, eps=0.1, epochs=2, ramp_epochs=1)
    assert trained.abstraction is not None and trained.abstraction.d == pytest.approx(0.2)
    results = ab.verify(trained, data.test_x[:20], data.test_y[:20], 0.1, ["abscert-paper", "abscert-sound"])
    assert {r.status for r in results["abscert-sound"]} <= {"verified", "falsified", "unknown"}
    assert len(results["abscert-sound"]) == 20
