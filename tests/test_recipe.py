"""Shi et al. 2021's recipe in the ibp / crown-ibp methods, loss fusion, and BatchNorm networks (cnn7, *_bn)."""
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abscert_bench.errors import UserError
from abscert_bench.lirpa import bounded_module, margin_lower_bounds, margin_matrix
from abscert_bench.models import create_model
from abscert_bench.training import create_method
from abscert_bench.training.config import TrainConfig
from abscert_bench.training.loop import train_model
from abscert_bench.training.recipes import SHI2021_MNIST
from abscert_bench.training.schedule import Schedule
from abscert_bench_baselines.bounds import FusedLoss, worst_case_logits
from abscert_bench_baselines.training import ibp_init, regularizer_terms

ROOT = Path(__file__).resolve().parents[1]


def sampled_ce(network, lower, upper, y, samples=40):
    """Largest clean CE per sample over random points and corners of the box (a lower bound of the true max)."""
    worst = torch.full((len(y),), -math.inf)
    with torch.no_grad():
        for _ in range(samples):
            for point in (lower + (upper - lower) * torch.rand_like(lower),
                          torch.where(torch.rand_like(lower) < 0.5, lower, upper)):
                worst = torch.maximum(worst, F.cross_entropy(network(point), y, reduction="none"))
    return worst


def unfused_robust_ce(bounded, lower, upper, y, method):
    lb = margin_lower_bounds(bounded, lower, upper, y, 10, method)
    return F.cross_entropy(worst_case_logits(lb, y, 10), y, reduction="none")


# ---------------------------------------------------------------- IBP initialisation


@pytest.mark.parametrize("name,shape", [("dm_medium", (1, 28, 28)), ("cnn7", (1, 8, 8))])
def test_ibp_init_statistics(name, shape):
    torch.manual_seed(0)
    net = create_model(name, shape, 10)
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    classifier_before = layers[-1].weight.detach().clone()
    ibp_init(net)
    for layer in layers[:-1]:
        w = layer.weight.detach().double().flatten()
        n = w.numel()
        fan_in = layer.weight[0].numel()
        sigma = math.sqrt(2 * math.pi) / fan_in
        assert abs(float(w.mean())) < 5 * sigma / math.sqrt(n)  # mean 0 within sampling error
        assert abs(float(w.std()) / sigma - 1) < 5 / math.sqrt(2 * n)  # std sqrt(2π)/fan_in within sampling error
        assert torch.count_nonzero(layer.bias) == 0
    assert torch.equal(layers[-1].weight, classifier_before)  # the classifier keeps its initialisation
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))


def test_init_option_applies_in_prepare():
    x = torch.rand(4, 1, 8, 8)
    for init, expect_ibp in (("ibp", True), ("default", False)):
        torch.manual_seed(0)
        net = create_model("dm_small", (1, 8, 8), 10)
        create_method("ibp", 0.1, init=init).prepare(net, x[:1])
        sigma = math.sqrt(2 * math.pi) / net[2].weight[0].numel()
        assert (abs(float(net[2].weight.std()) / sigma - 1) < 0.1) == expect_ibp


# ---------------------------------------------------------------- regularisers


def _method_loss(method_name, net, x, y, step, schedule, **options):
    method = create_method(method_name, 0.1, init="default", **options)
    method.prepare(net, x[:1])
    net.train()
    loss, _ = method.loss(net, x, y, schedule, step)
    return loss, method


@pytest.mark.parametrize("method_name,fusion", [("ibp", False), ("ibp", True), ("crown-ibp", True),
                                                ("crown-ibp", False)])
def test_regularizers_off_with_weight_zero_and_fading(digits, method_name, fusion):
    x, y = digits.train_x[:32], digits.train_y[:32]
    schedule = Schedule(eps=0.1, total_steps=40, warmup_steps=10, ramp_steps=20)
    for step in (0, 14, 29):  # warm-up (eps 0), mid-ramp, end of the ramp (eps at its target)
        torch.manual_seed(0)
        net = create_model("dm_small", (1, 8, 8), 10)
        state = {k: v.clone() for k, v in net.state_dict().items()}
        plain, off = _method_loss(method_name, net, x, y, step, schedule, reg_weight=0.0, loss_fusion=fusion)
        assert off.last_terms == {}
        net.load_state_dict(state)
        regularised, on = _method_loss(method_name, net, x, y, step, schedule, reg_weight=0.5, loss_fusion=fusion)
        if step == 0:
            with torch.no_grad():
                assert float(plain) == pytest.approx(float(F.cross_entropy(net(x), y)), abs=1e-6)
        fade = 1 - schedule.fraction(step)
        if fade == 0:
            assert on.last_terms == {} and float(regularised) == pytest.approx(float(plain), abs=1e-6)
            continue
        terms = on.last_terms
        assert all(math.isfinite(v) and v >= 0 for v in terms.values()) and terms["tightness"] > 0
        assert float(regularised - plain) == pytest.approx(0.5 * fade * sum(terms.values()), rel=1e-4)


def test_regularizer_gradient_is_a_descent_direction(digits):
    torch.manual_seed(0)
    net = create_model("dm_small", (1, 8, 8), 10).train()
    x = digits.train_x[:64]
    y = digits.train_y[:64]
    bounded = bounded_module(net, x)
    lower, upper = (x - 1e-3).clamp(0, 1), (x + 1e-3).clamp(0, 1)
    params = list(net.parameters())

    def value():
        bounded(x)
        margin_lower_bounds(bounded, lower, upper, y, 10, "ibp")
        terms = regularizer_terms(bounded, lower, upper, 0.5)
        return terms["tightness"] + terms["relu"]

    r0 = value()
    grads = torch.autograd.grad(r0, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    norm2 = sum(float((g ** 2).sum()) for g in grads)
    assert float(r0) > 0 and norm2 > 0
    h = 1e-2 / math.sqrt(norm2)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= h * g
        r1 = value()
    assert float(r1) < float(r0)
    # first order: the decrease matches h·|grad|² (the autograd gradient is the regulariser's gradient)
    assert (float(r0) - float(r1)) / (h * norm2) == pytest.approx(1.0, abs=0.25)


def test_regularizer_terms_by_hand():
    """One ReLU layer with known bounds: tightness and relu terms as in Shi et al.'s formulas."""

    class Node:
        pass

    class Relu:
        pass

    pre = Node()
    pre.lower = torch.tensor([[1.0, -4.0, -1.0, 2.0]])
    pre.upper = torch.tensor([[3.0, -2.0, 1.0, 4.0]])
    relu = Relu()
    relu.inputs = [pre]
    Relu.__name__ = "BoundRelu"
    bounded = type("B", (), {"_modules": {"r": relu}})()
    lower, upper = torch.zeros(1, 4), torch.full((1, 4), 0.5)  # input radius 0.25; layer radius mean 1
    terms = regularizer_terms(bounded, lower, upper, 0.5)
    assert float(terms["tightness"]) == pytest.approx((0.5 - 0.25) / 0.5)
    center = torch.tensor([2.0, -3.0, 0.0, 3.0])
    mean_ratio = (5 / 4) / (3 / 4)  # mean(c·active) / -mean(c·inactive)
    delta = (center - center.mean()) ** 2
    var_ratio = float(delta[[0, 3]].sum() / delta[1])
    expected = sum(max(0.0, 0.5 - min(r, 1 / r)) for r in (mean_ratio, var_ratio)) / 0.5
    assert float(terms["relu"]) == pytest.approx(expected)


# ---------------------------------------------------------------- loss fusion


@pytest.fixture(scope="module")
def relu_nets():
    torch.manual_seed(3)
    nets = {}
    for name in ("dm_small", "dm_small_bn"):
        net = create_model(name, (1, 8, 8), 10)
        net.train()
        with torch.no_grad():
            net(torch.rand(64, 1, 8, 8))  # non-trivial running statistics
        nets[name] = net.eval()
    return nets


@pytest.mark.parametrize("name", ["dm_small", "dm_small_bn"])
def test_loss_fusion_laws(relu_nets, name):
    """eps -> 0: both robust losses are the clean CE; eps > 0: both bound the CE of every point of the ball;
    IBP: fused == unfused (the fused bound of sum_j exp(z_j - z_y) is sum_j exp(ub(z_j - z_y)) with the same
    interval ub(z_j - z_y) = -lb(margin_j) as the unfused spec merged into the last linear layer)."""
    net = relu_nets[name]
    torch.manual_seed(4)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    fused, plain = FusedLoss(net, x), bounded_module(net, x)
    fused.logits(x, (y + 1) % 10)  # a forward with other labels must not leak into the bounds (stale gather index)
    with torch.no_grad():
        clean = F.cross_entropy(net(x), y, reduction="none")
    box = ((x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1))
    worst = sampled_ce(net, *box, y)
    for method in ("ibp", "crown-ibp"):
        tiny = ((x - 1e-8).clamp(0, 1), (x + 1e-8).clamp(0, 1))
        assert torch.allclose(fused.robust_ce(*tiny, y, method).detach(), clean, atol=1e-5)
        assert torch.allclose(unfused_robust_ce(plain, *tiny, y, method).detach(), clean, atol=1e-5)
        f, u = fused.robust_ce(*box, y, method).detach(), unfused_robust_ce(plain, *box, y, method).detach()
        assert torch.all(f >= worst - 1e-4) and torch.all(u >= worst - 1e-4)
        if method == "ibp":
            assert torch.allclose(f, u, rtol=1e-5, atol=1e-5)
    assert torch.allclose(fused.logits(x, y), net(x), atol=1e-5)


def test_loss_fusion_on_an_affine_network():
    """f = Wx + b: CROWN margins are exact, so unfused = log(1 + sum_j exp(max_x (z_j - z_y))); the fused bound
    maximises one linear upper relaxation (chords of exp) of sum_j exp(z_j - z_y), hence
    max CE <= fused <= unfused, and fused < unfused strictly when several classes compete."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 10, (6,))
    box = ((x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1))
    fused = FusedLoss(net, x).robust_ce(*box, y, "crown-ibp").detach()
    unfused = unfused_robust_ce(bounded_module(net, x), *box, y, "crown-ibp").detach()
    assert torch.all(sampled_ce(net, *box, y) <= fused + 1e-5)
    assert torch.all(fused <= unfused + 1e-5) and torch.any(fused < unfused - 1e-4)


def test_fused_and_unfused_ibp_training_take_the_same_steps(digits):
    x, y = digits.train_x[:96], digits.train_y[:96]
    weights = {}
    for fusion in (False, True):
        config = TrainConfig("digits", "dm_small", "ibp", 0.1, epochs=2, batch_size=32, warmup_epochs=0,
                             ramp_epochs=1)
        trained, metrics = train_model(config, create_method("ibp", 0.1, loss_fusion=fusion), x, y, x, y, 10)
        weights[fusion] = (torch.cat([p.detach().flatten() for p in trained.network.parameters()]),
                           [m["loss"] for m in metrics])
    assert weights[True][1] == pytest.approx(weights[False][1], rel=1e-4)
    assert torch.allclose(weights[True][0], weights[False][0], atol=1e-4)


# ---------------------------------------------------------------- options and recipe


def test_method_options_and_defaults():
    assert create_method("ibp", 0.1).describe() == {
        "name": "ibp", "init": "ibp", "reg_weight": 0.5, "reg_tol": 0.5, "loss_mix": "robust", "loss_fusion": False}
    assert create_method("crown-ibp", 0.1).describe()["loss_fusion"] is True
    for bad in ({"init": "xavier"}, {"reg_weight": -1.0}, {"reg_tol": 0.0}, {"loss_mix": "both"},
                {"loss_fusion": "yes"}, {"gamma": 1}):
        with pytest.raises(UserError):
            create_method("crown-ibp", 0.1, **bad)


def test_recipe_is_a_valid_config_and_matches_the_readme():
    TrainConfig("mnist", "cnn7", "ibp", 0.4, **SHI2021_MNIST).validate()
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```toml\n( *# Shi et al\. 2021.*?)```", readme, re.S)
    assert block, "README lacks the Shi et al. 2021 spec snippet"
    import textwrap

    import tomllib

    snippet = tomllib.loads(textwrap.dedent(block.group(1)))
    assert snippet["train"] == SHI2021_MNIST


# ---------------------------------------------------------------- BatchNorm


@pytest.mark.parametrize("shape,features", [((1, 28, 28), 25088), ((3, 32, 32), 32768), ((1, 8, 8), 2048)])
def test_cnn7_shapes(shape, features):
    net = create_model("cnn7", shape, 10)
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.stride[0], c.kernel_size[0], c.padding[0]) for c in convs] == [
        (64, 1, 3, 1), (64, 1, 3, 1), (128, 2, 3, 1), (128, 1, 3, 1), (128, 1, 3, 1)]
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(features, 512), (512, 10)]
    kinds = [type(m) for m in net]
    assert kinds.count(nn.BatchNorm2d) == 5 and kinds.count(nn.BatchNorm1d) == 1
    assert all(kinds[i + 1] in (nn.BatchNorm2d, nn.BatchNorm1d) for i, k in enumerate(kinds)
               if k in (nn.Conv2d,) or (k is nn.Linear and i < len(kinds) - 1))
    assert net(torch.rand(2, *shape)).shape == (2, 10)


@pytest.fixture(scope="module")
def skewed_bn_net():
    """dm_small_bn whose running statistics are far from any batch's: train- and eval-mode outputs differ a lot."""
    torch.manual_seed(6)
    net = create_model("dm_small_bn", (1, 8, 8), 10)
    for bn in (m for m in net.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.05, 0.5)
        bn.weight.data.uniform_(0.5, 2)
    return net


@pytest.mark.parametrize("verifier", ["ibp", "crown", "alpha-crown"])
def test_bound_verifiers_bound_the_eval_mode_network(skewed_bn_net, verifier):
    from abscert_bench.trained import TrainedModel
    from abscert_bench.verification import create_verifier

    net = skewed_bn_net.train()  # the verifier must switch to eval mode itself
    trained = TrainedModel(net, {"model": "dm_small_bn", "input_shape": [1, 8, 8], "num_classes": 10,
                                 "activation": "relu", "abstraction": None}, None)
    torch.manual_seed(7)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(net.train()(x), net.eval()(x), atol=0.1)
        y = net(x).argmax(1)
    v = create_verifier(verifier)
    lower, upper = (x - 0.01).clamp(0, 1), (x + 0.01).clamp(0, 1)
    net.train()
    bounded = v.bounded_for(trained, x)
    lb = v.margins(bounded, lower, upper, y, 10)
    net.eval()
    c = margin_matrix(y, 10)
    with torch.no_grad():
        for _ in range(100):
            point = torch.where(torch.rand_like(x) < 0.5, lower, upper)
            assert torch.all(torch.einsum("nck,nk->nc", c, net(point)) >= lb - 1e-4)
    v.release()


def test_bn_training_through_lirpa_updates_the_networks_statistics(digits):
    x, y = digits.train_x[:128], digits.train_y[:128]
    config = TrainConfig("digits", "dm_small_bn", "ibp", 0.05, epochs=1, batch_size=64, warmup_epochs=0,
                         ramp_epochs=1)
    trained, _ = train_model(config, create_method("ibp", 0.05), x, y, x, y, 10)
    bn = trained.network[1]
    assert float(bn.running_mean.abs().sum()) > 0 and int(bn.num_batches_tracked) == 0  # updated via auto_LiRPA
    # the BoundedModule in train mode is the network in train mode (batch statistics)
    net = trained.network
    method = create_method("ibp", 0.05, init="default")
    method.prepare(net, x[:1])
    net.train()
    logits = method.loss(net, x[:16], y[:16], Schedule(0.05, 10), 0)[1]
    net.eval()
    net.train()
    with torch.no_grad():
        assert torch.allclose(logits, net(x[:16]), atol=1e-4)


@pytest.mark.parametrize("model", ["dm_small_bn", "cnn7"])
def test_abscert_sound_on_a_bn_network(digits, model):
    """AbsCert-trained BN net on 8×8 digits: the folded gap form (Conv → BN) is exact at hull vertices in eval mode,
    and abscert-sound's verdicts hold (verified ⇒ paper-verified and sampled points keep the label)."""
    import numpy as np

    from abscert_bench.sound.bounds import HullBounder
    from abscert_bench.sound.choices import reachable_options
    from abscert_bench.verification import create_verifier

    config = TrainConfig("digits", model, "abscert", 0.05, epochs=1, method_options={"d": 0.2})
    trained, _ = train_model(config, create_method("abscert", 0.05, d=0.2), digits.train_x[:512],
                             digits.train_y[:512], digits.test_x[:8], digits.test_y[:8], 10)
    net = trained.network.eval()
    assert any(float(m.running_var.sub(1).abs().max()) > 1e-3 for m in net.modules()
               if isinstance(m, nn.BatchNorm2d))
    x, y = digits.test_x[:4], digits.test_y[:4]
    bounder = HullBounder(trained, method="ibp")
    assert bounder.folded
    options = reachable_options(trained.abstraction, x, 0.05)
    for s in range(2):
        choice = np.minimum(options.count[s] - 1, 1)
        first = choice[None]
        result = bounder.bound(options, np.array([s]), first, first, y[s:s + 1])
        z = torch.from_numpy(options.abstract(s, choice))[None]
        with torch.no_grad():
            logits = net(z)[0]
        exact = logits[int(y[s])] - logits[[j for j in range(10) if j != int(y[s])]]
        assert torch.allclose(result.margins[0], exact, atol=1e-4)
    sound = create_verifier("abscert-sound", timeout=2, bound_method="crown-ibp").verify(trained, x, y, 0.05)
    paper = create_verifier("abscert-paper").verify(trained, x, y, 0.05)
    classifier = trained.classifier()
    for s, p in zip(sound, paper):
        assert s.status in ("verified", "falsified", "unknown")
        if s.status == "verified":
            assert p.status == "verified"
            lower, upper = (x[s.index] - 0.05).clamp(0, 1), (x[s.index] + 0.05).clamp(0, 1)
            points = lower + (upper - lower) * torch.rand(64, *x.shape[1:])
            with torch.no_grad():
                assert torch.all(classifier(points).argmax(1) == y[s.index])
