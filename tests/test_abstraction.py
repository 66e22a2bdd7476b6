"""Laws of the abstraction (docs/architecture.md): one cell rule, exact on 8-bit levels, torch == numpy."""
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from abscert_bench.abstraction import (
    EDGE_TOLERANCE,
    Abstraction,
    cell_index,
    cell_lower,
    cell_upper,
    num_cells,
    phi,
    phi_numpy,
    reachable_cells,
    region_phi,
)
from abscert_bench.errors import UserError

GRANULARITIES = [0.05, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 1.0, 51 / 255, 0.15]


def _usable(d: float) -> bool:
    return not (1e-9 < abs(1 / d - round(1 / d)) <= 2.0 ** -16)


granularity = st.sampled_from(GRANULARITIES) | st.floats(0.01, 1.0).filter(_usable)
unit = st.floats(0.0, 1.0, allow_nan=False, width=32)


def exact_cell(level: int, d: float) -> int:
    """floor((level/255) / d) in exact rationals, d read as its shortest decimal, clamped to the last cell."""
    k = (Fraction(level, 255) / Fraction(repr(d))).__floor__()
    return min(k, num_cells(d) - 1)


@pytest.mark.parametrize("d", [0.05, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 1.0])
def test_all_256_levels_are_exact_and_agree(d):
    levels = torch.arange(256, dtype=torch.float32) / 255
    expected = np.array([exact_cell(i, d) for i in range(256)])
    assert np.array_equal(cell_index(levels, d).numpy(), expected)
    assert np.array_equal(cell_index(levels.numpy(), d), expected)


def test_edge_value_51_over_255_is_in_upper_cell():
    v = torch.tensor([51 / 255], dtype=torch.float32)
    assert int(cell_index(v, 0.2)) == 1
    assert float(cell_lower(cell_index(v, 0.2), 0.2)) == pytest.approx(0.2)


def test_num_cells():
    assert num_cells(0.2) == 5 and num_cells(0.1) == 10 and num_cells(0.3) == 4 and num_cells(1.0) == 1


@settings(max_examples=300, deadline=None)
@given(v=unit, d=granularity)
def test_cell_contains_value(v, d):
    k = int(cell_index(np.float32(v), d))
    lo, hi = float(cell_lower(k, d)), float(cell_upper(k, d))
    assert 0 <= k < num_cells(d)
    slack = 2.0 ** -16 * d + 1e-7  # the documented edge tolerance
    assert lo - slack <= v <= hi + 1e-7
    if v < 1.0:
        assert v < hi + 1e-7


@settings(max_examples=100, deadline=None)
@given(d=granularity)
def test_cells_tile_unit_interval(d):
    k = np.arange(num_cells(d))
    lower, upper = cell_lower(k, d), cell_upper(k, d)
    assert lower[0] == 0 and upper[-1] == pytest.approx(1.0)
    assert np.allclose(upper[:-1], lower[1:])
    assert (upper > lower).all()


@settings(max_examples=200, deadline=None)
@given(values=st.lists(unit, min_size=1, max_size=50), d=granularity)
def test_torch_and_numpy_phi_agree_near_edges(values, d):
    base = np.array(values, dtype=np.float32)
    edges = (np.round(base / d) * d).astype(np.float32)
    near = np.concatenate([base, edges, np.nextafter(edges, 0), np.nextafter(edges, 1)]).clip(0, 1)
    x = near.reshape(1, 1, 1, -1)
    assert np.array_equal(phi(torch.from_numpy(x), d).numpy(), phi_numpy(x, d))


@settings(max_examples=200, deadline=None)
@given(v=unit, eps=st.floats(0, 0.3), d=granularity, t=st.floats(-1, 1))
def test_reachable_set_contains_cell_of_every_ball_point(v, eps, d, t):
    x = torch.tensor([v], dtype=torch.float32)
    first, last = reachable_cells(x, d, eps)
    x_prime = torch.clamp(x + t * eps, 0, 1)
    k = cell_index(x_prime, d)
    assert int(first) <= int(k) <= int(last)


def test_phi_shape_and_channels():
    x = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, :3] = torch.tensor([0.25, 0.25 - 0.25 * EDGE_TOLERANCE / 2, 0.5])  # on an edge, and just below one
    out = phi(x, 0.25)
    assert out.shape == (4, 6, 5, 5)
    # the cell rule's tolerance moves each edge down by EDGE_TOLERANCE of a cell: a value that close below an edge
    # belongs to the cell above it
    assert torch.all(out[:, :3] <= x + 0.25 * EDGE_TOLERANCE) and torch.all(x <= out[:, 3:] + 1e-6)
    assert float(out[0, 0, 0, 1]) == 0.25 and float(out[0, 0, 0, 0]) == 0.25


def test_region_phi_covers_interval():
    x = torch.rand(3, 1, 4, 4)
    out = region_phi(x, 0.2, 0.1)
    assert torch.all(out[:, :1] <= (x - 0.1).clamp(0, 1) + 1e-6)
    assert torch.all(out[:, 1:] >= (x + 0.1).clamp(0, 1) - 1e-6)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_bad_granularity(bad):
    with pytest.raises(UserError, match="granularity"):
        Abstraction("point", bad)


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan")])
def test_bad_eps(bad):
    with pytest.raises(UserError, match="eps"):
        Abstraction("region", 0.2, bad)


def test_granularity_just_below_one_over_k_is_refused():
    with pytest.raises(UserError, match="narrower"):
        Abstraction("point", 0.99999)


@pytest.mark.parametrize("d", [1 / 3 + 1e-9, 0.2 + 1e-8, 0.5 + 1e-7])
def test_granularity_just_above_one_over_k_is_refused(d):
    """The README's rule holds on both sides of 1/K: within the tolerance of it but not equal is refused."""
    with pytest.raises(UserError, match="overhang"):
        Abstraction("point", d)


@pytest.mark.parametrize("d", [1 / 3, 1 / 7, 0.2, 1.0])
def test_granularity_one_over_k_is_accepted(d):
    assert Abstraction("point", d).d == d


def test_bad_variant():
    with pytest.raises(UserError, match="point, region"):
        Abstraction("cubes", 0.2)
