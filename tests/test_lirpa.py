"""auto_LiRPA 0.3 works on this torch/numpy through our shims, and its bounds contain sampled outputs."""
import pytest
import torch

from abscert_bench.lirpa import bounded_module, margin_lower_bounds, margin_matrix
from abscert_bench.lirpa_compat import applied_shims, lirpa
from abscert_bench.models import create_model

METHODS = ["ibp", "crown-ibp", "crown", "alpha-crown"]


@pytest.fixture(scope="module")
def conv_net():
    torch.manual_seed(0)
    return create_model("dm_small", (1, 8, 8), 10).eval()


def test_shims_are_applied_only_when_needed():
    lib = lirpa()
    assert hasattr(lib, "BoundedModule")
    # each shim name appears at most once, and lirpa() is idempotent
    assert len(applied_shims()) == len(set(applied_shims()))
    lirpa()
    assert len(applied_shims()) == len(set(applied_shims()))


@pytest.mark.parametrize("method", METHODS)
def test_margin_bounds_contain_sampled_outputs(conv_net, method):
    torch.manual_seed(1)
    x = torch.rand(4, 1, 8, 8)
    y = conv_net(x).argmax(1)
    eps = 0.05
    lower, upper = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    bounded = bounded_module(conv_net, x)
    lb = margin_lower_bounds(bounded, lower, upper, y, 10, method).detach()
    c = margin_matrix(y, 10)
    with torch.no_grad():
        for _ in range(200):
            sample = lower + (upper - lower) * torch.rand_like(x)
            corners = torch.where(torch.rand_like(x) < 0.5, lower, upper)
            for point in (sample, corners):
                margins = torch.einsum("nck,nk->nc", c, conv_net(point))
                assert torch.all(margins >= lb - 1e-4)


def test_bounds_backpropagate_for_training(conv_net):
    x = torch.rand(3, 1, 8, 8)
    y = torch.tensor([0, 1, 2])
    bounded = bounded_module(conv_net, x)
    lb = margin_lower_bounds(bounded, (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1), y, 10, "crown-ibp")
    (-lb.sum()).backward()
    grads = [p.grad for p in conv_net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    conv_net.zero_grad()


def test_crown_is_at_least_as_tight_as_ibp_here(conv_net):
    x = torch.rand(4, 1, 8, 8)
    y = conv_net(x).argmax(1)
    bounded = bounded_module(conv_net, x)
    box = ((x - 0.02).clamp(0, 1), (x + 0.02).clamp(0, 1))
    ibp = margin_lower_bounds(bounded, *box, y, 10, "ibp").detach()
    alpha = margin_lower_bounds(bounded, *box, y, 10, "alpha-crown").detach()
    assert (alpha.mean() >= ibp.mean())
