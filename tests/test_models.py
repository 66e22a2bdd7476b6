"""Every registered architecture builds for any input size/channel count and auto_LiRPA can bound it."""
import pytest
import torch
from torch import nn

from abscert_bench.errors import UserError
from abscert_bench.lirpa import bounded_module, margin_lower_bounds
from abscert_bench.models import MODELS, count_parameters, create_model

SHAPES = [(1, 8, 8), (2, 28, 28), (3, 32, 32), (6, 32, 32)]


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("shape", SHAPES)
def test_builds_for_any_input(name, shape):
    model = create_model(name, shape, 10)
    assert model(torch.rand(2, *shape)).shape == (2, 10)
    assert count_parameters(model) > 0


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_activation_is_a_parameter(name, activation):
    model = create_model(name, (1, 8, 8), 10, activation=activation)
    kinds = {type(m) for m in model.modules()}
    expected = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[activation]
    assert expected in kinds
    assert not ({nn.ReLU, nn.Sigmoid, nn.Tanh} - {expected}) & kinds


@pytest.mark.parametrize("name", MODELS.names())
def test_auto_lirpa_wraps_every_model(name):
    model = create_model(name, (2, 8, 8), 10, activation="tanh" if name == "fc3" else "relu").eval()
    x = torch.rand(2, 2, 8, 8)
    y = model(x).argmax(1)
    lb = margin_lower_bounds(bounded_module(model, x), x, x, y, 10, "ibp")
    # a zero-width box: the bound is the exact margin
    exact = model(x).gather(1, y[:, None]) - model(x)
    exact = exact[exact != 0].view(2, 9)
    assert torch.allclose(lb, exact, atol=1e-4)


def test_normalisation_layer_is_inside():
    model = create_model("fc3", (3, 8, 8), 10, normalize=([0.5, 0.5, 0.5], [0.2, 0.2, 0.2]))
    assert model(torch.rand(1, 3, 8, 8)).shape == (1, 10)
    with pytest.raises(UserError, match="channels"):
        create_model("fc3", (3, 8, 8), 10, normalize=([0.5], [0.2]))


def test_unknown_names_list_valid_ones():
    with pytest.raises(UserError, match="dm_small"):
        create_model("resnet1000", (1, 8, 8), 10)
    with pytest.raises(UserError, match="relu"):
        create_model("fc3", (1, 8, 8), 10, activation="swish")


def test_too_small_input_is_an_error():
    with pytest.raises(UserError, match="too small"):
        create_model("dm_small", (1, 1, 1), 10)
    with pytest.raises(UserError, match="too small"):
        create_model("lenet5", (1, 3, 3), 10)
