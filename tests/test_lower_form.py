"""The lower-end training form of N(phi(x)) for d = 1/K equals the plain form, values and gradients."""
import pytest
import torch

from abscert_bench.abstraction import phi
from abscert_bench.models import create_model
from abscert_bench.training.lower_form import divides_one, lower_forward


@pytest.mark.parametrize("model", ["fc3", "dm_small", "cnn7"])
@pytest.mark.parametrize("d", [0.2, 1 / 9, 0.5])
@pytest.mark.parametrize("normalize", [False, True])
def test_lower_form_matches_plain_form(model, d, normalize):
    torch.manual_seed(0)
    shape = (1, 8, 8)
    norm = ([0.5, 0.5], [0.5, 0.5]) if normalize else None
    network = create_model(model, (2, 8, 8), 10, normalize=norm)
    network.train()
    x = torch.rand(6, *shape)
    x[0, 0, 0, :4] = torch.tensor([0.0, 1.0, d, 1 - d])  # edges and the clipped end
    z = phi(x, d)
    plain = network(z)
    plain.square().sum().backward()
    plain_grads = [p.grad.clone() for p in network.parameters()]
    network.zero_grad()
    fast = lower_forward(network, z[:, :1], d)
    assert fast is not None
    fast.square().sum().backward()
    assert torch.allclose(fast, plain, atol=1e-5, rtol=1e-4)
    for g_fast, g_plain in zip((p.grad for p in network.parameters()), plain_grads):
        assert torch.allclose(g_fast, g_plain, atol=1e-4, rtol=1e-3)


def test_only_widths_that_divide_one_qualify():
    assert divides_one(0.2) and divides_one(1 / 9) and divides_one(1.0) and divides_one(0.25)
    assert not divides_one(0.4) and not divides_one(0.3) and not divides_one(0.6)


def test_nested_body_without_normalisation():
    torch.manual_seed(1)
    body = create_model("dm_small", (2, 8, 8), 10)
    network = torch.nn.Sequential(body, torch.nn.ReLU())
    z = phi(torch.rand(3, 1, 8, 8), 0.25)
    assert torch.allclose(lower_forward(network, z[:, :1], 0.25), network(z), atol=1e-5)


def test_other_shapes_fall_back():
    network = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(128, 10))
    assert lower_forward(network, torch.rand(2, 1, 8, 8), 0.2) is None
