"""abscert-sound: exact agreement with brute force on tiny networks, soundness laws, re-checks, bad input."""
from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from abscert_bench.abstraction import EDGE_TOLERANCE, Abstraction, cell_index, num_cells, reachable_cells
from abscert_bench.errors import UserError
from abscert_bench.sound.attack import margins_from_logits
from abscert_bench.sound.bounds import HullBounder, fold_gap_form
from abscert_bench.sound.choices import reachable_options
from abscert_bench.sound.recheck import recheck_counterexample, recheck_file, save_counterexamples
from abscert_bench.trained import TrainedModel, build_network, save_checkpoint
from abscert_bench.verification import create_verifier
from abscert_bench.verification.base import SampleResult

SHAPE = (1, 3, 3)
CLASSES = 3


pytestmark = pytest.mark.usefixtures("one_thread")


class Unfoldable(nn.Module):
    """Not an nn.Sequential: the bounds must use the explicit gap pre-map."""

    def __init__(self, inputs: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(inputs, 10), nn.ReLU(), nn.Linear(10, CLASSES))

    def forward(self, z):
        return self.body(z)


def tiny_model(seed: int, variant: str, d: float, abs_eps: float = 0.0, kind: str = "fc") -> TrainedModel:
    """A random small network N on 2C×3×3 abstract inputs, with its abstraction."""
    torch.manual_seed(seed)
    c, h, w = SHAPE
    inputs = 2 * c * h * w
    if kind == "fc":
        net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                            nn.Linear(12, CLASSES))
    elif kind == "conv":
        net = nn.Sequential(nn.Conv2d(2 * c, 4, 2, padding=1), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * (h + 1) * (w + 1), CLASSES))
    elif kind == "conv2":  # two convolutions: the second one's bounds come from a CROWN pass over patches
        net = nn.Sequential(nn.Conv2d(2 * c, 4, 2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 2), nn.ReLU(),
                            nn.Flatten(), nn.Linear(4 * h * w, CLASSES))
    elif kind == "deep":  # BatchNorm and a dense tail: forward bounds' back-substitution through conv, BN, linear
        net = nn.Sequential(nn.Conv2d(2 * c, 4, 2, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 2),
                            nn.ReLU(), nn.Flatten(), nn.Linear(4 * h * w, 8), nn.BatchNorm1d(8), nn.ReLU(),
                            nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, CLASSES))
        for bn in (net[1], net[7]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(-1.5, 1.5)
    else:
        net = Unfoldable(inputs)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    abstraction = Abstraction(variant, d, abs_eps)
    config = {"model": "tiny", "input_shape": list(SHAPE), "num_classes": CLASSES, "activation": "relu",
              "abstraction": abstraction.to_dict()}
    return TrainedModel(net.eval(), config, abstraction)


def transition_points(abstraction: Abstraction) -> np.ndarray:
    """Values where the abstraction of a single pixel can change: cell edges, where the cell rule's
    tolerance moves them (k - 2^-16)·d, shifted by ±eps for 'region'."""
    d, k = abstraction.d, num_cells(abstraction.d)
    edges = np.concatenate([np.arange(1, k) * d, (np.arange(1, k) - EDGE_TOLERANCE) * d])
    if abstraction.variant == "region":
        edges = np.concatenate([edges - abstraction.eps, edges + abstraction.eps])
    return edges[(edges > 0) & (edges < 1)]


def float32_window(points: np.ndarray, ulps: int = 64) -> np.ndarray:
    """Every float32 within `ulps` ulps of each point (brute force must see slivers a few ulps wide)."""
    bits = np.abs(points).astype(np.float32).view(np.int32).astype(np.int64)
    window = (bits[:, None] + np.arange(-ulps, ulps + 1)[None, :]).clip(0, None)
    return window.astype(np.int32).view(np.float32).ravel()


def safe_images(abstraction: Abstraction, eps: float, n: int, rng) -> torch.Tensor:
    """Random images whose ball ends stay 1e-4 away from every transition (brute force stays exact)."""
    edges = transition_points(abstraction)
    out = []
    while len(out) < n * int(np.prod(SHAPE)):
        v = rng.random()
        ends = np.array([v - eps, v + eps])
        if edges.size == 0 or np.min(np.abs(ends[:, None] - edges[None, :])) > 1e-4:
            out.append(v)
    return torch.tensor(out, dtype=torch.float32).view(n, *SHAPE)


def pixel_pairs(abstraction: Abstraction, v: float, eps: float) -> list[tuple[float, float]]:
    """Brute force: every abstract (lower, upper) a pixel value in the clipped ball can produce."""
    lo, hi = max(v - eps, 0.0), min(v + eps, 1.0)
    near = float32_window(transition_points(abstraction))
    ends = float32_window(np.array([lo, hi]))
    values = np.concatenate([np.linspace(lo, hi, 401).astype(np.float32), near, ends])
    values = values[(values.astype(np.float64) >= lo) & (values.astype(np.float64) <= hi)]
    with torch.no_grad():
        pairs = abstraction(torch.from_numpy(values).view(1, 1, 1, -1)).view(2, -1).numpy()
    return sorted(set(zip(pairs[0].tolist(), pairs[1].tolist())))


def brute_force(trained: TrainedModel, x: torch.Tensor, y: int, eps: float) -> bool:
    """True ⇔ N classifies every reachable abstract input as y."""
    c, h, w = SHAPE
    per_pixel = [pixel_pairs(trained.abstraction, float(v), eps) for v in x.reshape(-1)]
    combos = np.array(list(itertools.product(*per_pixel)), dtype=np.float32)  # n × P × 2
    z = np.concatenate([combos[:, :, 0], combos[:, :, 1]], axis=1).reshape(-1, 2 * c, h, w)
    with torch.no_grad():
        predicted = trained.network(torch.from_numpy(z)).argmax(1)
    return bool((predicted == y).all())


def labelled_batch(trained: TrainedModel, eps: float, seed: int, n: int = 6):
    rng = np.random.default_rng(seed)
    x = safe_images(trained.abstraction, eps, n, rng)
    with torch.no_grad():
        y = trained.classifier()(x).argmax(1)
    return x, y


CONFIGS = [  # (variant, d, eps, abstraction eps, network kind)
    ("point", 0.2, 0.1, 0.0, "fc"),        # d = 2·eps
    ("point", 0.25, 0.08, 0.0, "conv"),    # d > 2·eps, conv first layer (folded)
    ("point", 0.2, 0.15, 0.0, "fc"),       # d < 2·eps: up to three cells per pixel
    ("point", 0.3, 0.1, 0.0, "unfoldable"),  # d does not divide 1 (clipped last cell), pre-map path
    ("region", 0.2, 0.1, 0.1, "fc"),
    ("region", 0.25, 0.15, 0.05, "conv"),  # d < 2·eps
]
MODES = {
    "default": {},
    "bab": {"enumerate_limit": 0, "attack": False},  # no enumeration, no attack: bounds and BaB decide
}
EXTRA_MODES = {
    # BaB driven by loose IBP bounds: deep trees whose leaves are single abstract inputs.
    "ibp": {"enumerate_limit": 0, "attack": False, "bound_method": "ibp"},
    "alpha": {"enumerate_limit": 0, "attack": False, "bound_method": "alpha-crown"},
    # auto_LiRPA's batched CROWN: intermediate layers' unstable neurons two at a time
    "batched": {"enumerate_limit": 0, "attack": False, "crown_batch": 2},
    # ReLU-input bounds from forward linear bounds over the moving coordinates (sound.forward)
    "forward": {"enumerate_limit": 0, "attack": False, "intermediate": "forward"},
    "forward-alpha": {"enumerate_limit": 0, "attack": False, "intermediate": "forward", "bound_method": "alpha-crown"},
    # branch and bound's refreshes by CROWN of the parent's unstable neurons (`ForwardBounds.refreshed`)
    "windows-refresh": {"enumerate_limit": 0, "attack": False, "bab_refresh": "windows"},
    # α-CROWN on the margins of the root and of every domain branch and bound leaves open (`sound.alpha`)
    "alpha-margins": {"enumerate_limit": 0, "attack": False, "alpha_iterations": 30, "bab_alpha": 5},
    # branch and bound's refreshes with the first two ReLU layers by `second.SecondLayerBounds`
    "second-conv": {"enumerate_limit": 0, "attack": False, "bab_refresh": "second-conv"},
}
EXTRA = [CONFIGS[0] + ("ibp",), CONFIGS[1] + ("ibp",), CONFIGS[0] + ("alpha",), CONFIGS[4] + ("alpha",),
         CONFIGS[0] + ("batched",), ("point", 0.25, 0.08, 0.0, "conv2", "batched"), CONFIGS[2] + ("batched",),
         ("region", 0.25, 0.15, 0.05, "conv2", "batched")]
EXTRA += [config + ("forward",) for config in CONFIGS if config[4] != "unfoldable"]
EXTRA += [("point", 0.25, 0.08, 0.0, "deep", "forward"), ("region", 0.25, 0.15, 0.05, "deep", "forward"),
          ("point", 0.2, 0.15, 0.0, "deep", "forward"), ("point", 0.25, 0.08, 0.0, "conv2", "forward-alpha")]
EXTRA += [("point", 0.25, 0.08, 0.0, "conv2", "windows-refresh"), ("point", 0.2, 0.15, 0.0, "deep", "windows-refresh"),
          ("region", 0.25, 0.15, 0.05, "deep", "windows-refresh")]
# the defaults with forced branch and bound on a deep chain: forward root bounds and windows refreshes ('auto')
EXTRA += [("point", 0.2, 0.15, 0.0, "deep", "bab"), ("region", 0.25, 0.15, 0.05, "deep", "bab")]
EXTRA += [CONFIGS[2] + ("alpha-margins",), ("region", 0.25, 0.15, 0.05, "conv2", "alpha-margins"),
          ("point", 0.2, 0.15, 0.0, "deep", "alpha-margins")]
EXTRA += [("point", 0.25, 0.08, 0.0, "conv2", "second-conv"), ("point", 0.2, 0.15, 0.0, "conv2", "second-conv"),
          ("region", 0.25, 0.15, 0.05, "conv2", "second-conv")]


@pytest.mark.parametrize("config", CONFIGS + EXTRA,
                         ids=lambda c: f"{c[0]}-d{c[1]}-eps{c[2]}-{c[4]}" + (f"-{c[5]}" if len(c) > 5 else ""))
def test_agrees_with_brute_force(config):
    variant, d, eps, abs_eps, kind = config[:5]
    modes = {config[5]: {**MODES, **EXTRA_MODES}[config[5]]} if len(config) > 5 else MODES
    seen = set()
    for seed in range(3):
        trained = tiny_model(seed, variant, d, abs_eps, kind)
        x, y = labelled_batch(trained, eps, seed)
        truth = [brute_force(trained, x[i], int(y[i]), eps) for i in range(len(x))]
        for mode, options in modes.items():
            results = create_verifier("abscert-sound", **options).verify(trained, x, y, eps)
            for i, result in enumerate(results):
                assert result.status == ("verified" if truth[i] else "falsified"), (seed, mode, i, result.details)
                seen.add(result.status)
                if result.status == "falsified":
                    ok, message = recheck_counterexample(trained, x[i], int(y[i]), eps, result.counterexample)
                    assert ok, message
                if mode != "default":
                    assert result.details["stage"] in ("clean", "bounds", "bab"), result.details
    assert seen == {"verified", "falsified"}, "the configuration should produce both answers"


def sample_ball(abstraction: Abstraction, x: torch.Tensor, eps: float, rng, count: int) -> torch.Tensor:
    """Concrete images in the clipped ball: uniform, ball ends, and pixels on transition points."""
    flat = x.reshape(-1).double().numpy()
    lo, hi = np.clip(flat - eps, 0, 1), np.clip(flat + eps, 0, 1)
    edges = transition_points(abstraction)
    out = []
    for k in range(count):
        kind = k % 3
        if kind == 0:
            v = lo + (hi - lo) * rng.random(flat.size)
        elif kind == 1:
            v = np.where(rng.random(flat.size) < 0.5, lo, hi)
        else:
            v = flat.copy()
            for i in range(flat.size):
                inside = edges[(edges >= lo[i]) & (edges <= hi[i])]
                if inside.size:
                    v[i] = rng.choice(inside)
        v32 = v.astype(np.float32)
        v32 = np.where(np.abs(v32.astype(np.float64) - flat) > eps, flat.astype(np.float32), v32)
        out.append(v32.reshape(x.shape))
    return torch.from_numpy(np.stack(out))


@pytest.mark.parametrize("variant,d,eps,abs_eps", [("point", 0.2, 0.1, 0.0), ("point", 0.2, 0.15, 0.0),
                                                    ("region", 0.2, 0.1, 0.1)])
def test_soundness_law(variant, d, eps, abs_eps):
    """Never verified in one configuration and falsified in another; verified ⇒ every sampled x' gives y."""
    rng = np.random.default_rng(7)
    for seed in range(3):
        trained = tiny_model(100 + seed, variant, d, abs_eps)
        x = torch.from_numpy(rng.random((8, *SHAPE)).astype(np.float32))
        x[:, :, 0, 0] = 0.2 - 1e-3  # a pixel right below an edge and one on it
        x[:, :, 1, 1] = 0.2
        with torch.no_grad():
            y = trained.classifier()(x).argmax(1)
        answers = [create_verifier("abscert-sound", **opts).verify(trained, x, y, eps)
                   for opts in (*MODES.values(), {"attack": False})]
        for i in range(len(x)):
            statuses = {a[i].status for a in answers}
            assert not {"verified", "falsified"} <= statuses
            if "verified" in statuses:
                concrete = sample_ball(trained.abstraction, x[i], eps, rng, 150)
                with torch.no_grad():
                    assert bool((trained.classifier()(concrete).argmax(1) == y[i]).all())


def edge_model() -> TrainedModel:
    """N predicts class 1 exactly when pixel 0's abstract lower end is >= 0.1 (cell >= 1 for d = 0.2)."""
    c, h, w = SHAPE
    net = nn.Sequential(nn.Flatten(), nn.Linear(2 * c * h * w, 2))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.copy_(torch.tensor([0.1, -0.1]))
        net[1].weight[0, 0], net[1].weight[1, 0] = -1.0, 1.0
    abstraction = Abstraction("point", 0.2)
    config = {"model": "tiny", "input_shape": list(SHAPE), "num_classes": 2, "abstraction": abstraction.to_dict()}
    return TrainedModel(net.eval(), config, abstraction)


def test_paper_check_verifies_what_the_sound_check_falsifies():
    trained = edge_model()
    x = torch.full((1, *SHAPE), 0.5)
    x[0, 0, 0, 0] = 0.19  # cell 0, but 0.19 + eps crosses the edge at 0.2
    y = torch.tensor([0])
    eps = 0.05  # d = 0.2 >= 2·eps: the paper's criterion applies
    paper = create_verifier("abscert-paper").verify(trained, x, y, eps)[0]
    sound = create_verifier("abscert-sound").verify(trained, x, y, eps)[0]
    assert paper.status == "verified"
    assert sound.status == "falsified"
    ok, message = recheck_counterexample(trained, x[0], 0, eps, sound.counterexample)
    assert ok, message
    assert sound.counterexample[0, 0, 0] >= 0.19 and cell_index(sound.counterexample[0, 0, 0], 0.2) == 1
    # far from the edge both agree
    x[0, 0, 0, 0] = 0.05
    assert create_verifier("abscert-sound").verify(trained, x, y, eps)[0].status == "verified"


def test_options_match_the_cell_rule_on_8bit_levels():
    levels = torch.arange(256, dtype=torch.float32).div(255).view(1, 1, 16, 16)
    for d, eps in [(0.2, 0.1), (0.1, 0.1), (0.3, 0.05), (0.2, 4 / 255)]:
        abstraction = Abstraction("point", d)
        options = reachable_options(abstraction, levels, eps)
        first, last = (t.view(-1).numpy() for t in reachable_cells(levels, d, eps))
        assert (options.count[0] >= last - first + 1).all()
        for p in range(256):
            for j in range(options.count[0, p]):
                value = options.value[0, p, j]
                assert abs(float(value) - float(levels.view(-1)[p])) <= eps + 1e-7
                with torch.no_grad():
                    pair = abstraction(torch.tensor(value).view(1, 1, 1, 1)).view(-1)
                assert (float(pair[0]), float(pair[1])) == (options.lower[0, p, j], options.upper[0, p, j])


def test_gap_form_is_exact_on_vertices():
    """The bounded network equals N on every reachable abstract input (no float32 relu-form drift)."""
    trained = tiny_model(3, "point", 0.2)
    x, y = labelled_batch(trained, 0.1, 3, n=2)
    options = reachable_options(trained.abstraction, x, 0.1)
    bounder = HullBounder(trained)
    assert bounder.folded and fold_gap_form(nn.Sequential(nn.Identity()), 1) is None
    choice = np.minimum(options.count - 1, 1)
    for s in range(2):
        first = choice[s][None]
        result = bounder.bound(options, np.array([s]), first, first, y[s:s + 1])
        z = torch.from_numpy(options.abstract(s, choice[s]))[None]
        with torch.no_grad():
            logits = trained.network(z)[0]
        others = [j for j in range(CLASSES) if j != int(y[s])]
        exact = logits[int(y[s])] - logits[others]
        assert torch.allclose(result.margins[0], exact, atol=1e-5)


def test_clean_misclassified_is_falsified_with_the_image():
    trained = tiny_model(0, "point", 0.2)
    x, y = labelled_batch(trained, 0.1, 0, n=2)
    wrong = (y + 1) % CLASSES
    results = create_verifier("abscert-sound").verify(trained, x, wrong, 0.1)
    for i, result in enumerate(results):
        assert result.status == "falsified" and result.details["stage"] == "clean"
        assert np.array_equal(result.counterexample, x[i].numpy())


def test_details_and_protocol():
    trained = tiny_model(1, "point", 0.2)
    x, y = labelled_batch(trained, 0.1, 1, n=4)
    verifier = create_verifier("abscert-sound", timeout=5)
    results = verifier.verify(trained, x, y, 0.1, indices=[10, 11, 12, 13])
    assert [r.index for r in results] == [10, 11, 12, 13]
    for r in results:
        assert isinstance(r, SampleResult) and r.time_s >= 0
        assert {"choice_pixels", "branches", "stage", "attack_s", "bounds_s", "bab_s"} <= set(r.details)
        assert (r.counterexample is not None) == (r.status == "falsified")
    assert [a[0] for a in verifier.verify_batch(trained, x, y, 0.1)] == [r.status for r in results]
    assert verifier.sound and verifier.name == "abscert-sound"


def test_timeout_gives_unknown():
    trained = tiny_model(2, "point", 0.2, kind="fc")
    x = torch.full((1, *SHAPE), 0.5)  # every pixel a choice pixel (0.5 ± 0.15 spans an edge)
    with torch.no_grad():
        y = trained.classifier()(x).argmax(1)
    verifier = create_verifier("abscert-sound", timeout=1e-9, enumerate_limit=0, attack=False, bound_method="ibp")
    result = verifier.verify(trained, x, y, 0.15)[0]
    assert result.status in ("unknown", "verified")  # IBP may still prove it at the root
    if result.status == "unknown":
        assert result.details["stage"] == "timeout"


def test_bab_stopped_inside_a_bound_call_reports_its_branches():
    """A search whose time runs out inside a bound call is `unknown` (stage timeout) with the domains it had made."""
    from abscert_bench.budget import BoundTimeout
    from abscert_bench.sound.search import branch_and_bound

    trained = tiny_model(2, "point", 0.2, kind="fc")
    x = torch.full((1, *SHAPE), 0.5)  # every pixel a choice pixel
    with torch.no_grad():
        y = trained.classifier()(x).argmax(1)
    options = reachable_options(trained.abstraction, x, 0.15)
    bounder = HullBounder(trained, method="ibp")
    calls = []
    real = bounder.bound

    def bound(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) > 2:
            raise BoundTimeout("stopped inside the call")
        result = real(*args, **kwargs)
        result.margins = result.margins.clamp(max=-1.0)  # nothing verifies: the search has to go on
        return result

    bounder.bound = bound
    outcome = branch_and_bound(bounder, trained.network, options, 0, int(y[0]), None, float("inf"),
                               batch=4, enumerate_limit=1)
    assert outcome.status == "unknown" and outcome.stage == "timeout"
    assert outcome.branches == sum(calls[1:]) > 0


@pytest.mark.parametrize("refresh", ["lirpa", "windows"])
def test_bab_calls_fit_the_time_left(monkeypatch, refresh):
    """Branch and bound sizes its calls by their measured seconds per domain: no call after the first of its kind
    ends past the deadline, a due refresh that no longer fits is replaced by cheap bounds, and the search ends
    `unknown` when not even those fit (a fake clock: a cheap domain costs 0.1 s, a refreshed one 1 s)."""
    from abscert_bench.sound import search

    trained = tiny_model(2, "point", 0.2, kind="fc")
    x = torch.full((1, *SHAPE), 0.5)  # every pixel a choice pixel
    with torch.no_grad():
        y = trained.classifier()(x).argmax(1)
    options = reachable_options(trained.abstraction, x, 0.15)
    bounder = HullBounder(trained, refresh=refresh)
    clock = [0.0]
    monkeypatch.setattr(search, "time", type("FakeTime", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    calls = []
    real = bounder.bound

    def bound(*args, reference=None, deadline=None, **kwargs):
        result = real(*args, reference=reference, **kwargs)  # (the real guard's deadline is on the real clock)
        start, kind = clock[0], "refresh" if reference else "cheap"
        clock[0] += (1.0 if reference else 0.1) * len(args[1])
        calls.append((kind, len(args[1]), start, clock[0]))
        result.margins = result.margins.clamp(max=-1.0)  # nothing verifies: the search has to go on
        result.coeff_lower = result.coeff_upper = None  # no counterexample candidates
        return result

    bounder.bound = bound
    root = real(options, np.array([0]), np.zeros_like(options.count[:1]), options.count[:1] - 1, y)
    deadline = 6.0
    outcome = search.branch_and_bound(bounder, trained.network, options, 0, int(y[0]), root, deadline, batch=8,
                                      enumerate_limit=1)
    assert outcome.status == "unknown" and outcome.stage == "timeout"
    assert "would pass the deadline" in outcome.notes["stopped"]
    # the root's children are refreshed at once where refreshes are by windows, bounded cheaply otherwise
    assert calls[0][0] == ("refresh" if refresh == "windows" else "cheap")
    assert {kind for kind, *_ in calls} == {"cheap", "refresh"}
    assert all(end <= deadline + 1e-9 for *_, end in calls)
    assert deadline - clock[0] < 0.2  # it stopped only when one more domain pair's cheap bound did not fit
    # near the end a refresh (2 s for a pair) no longer fits: the search went on with cheap bounds only
    late = [kind for kind, _, start, _ in calls if start > deadline - 2.0]
    assert late and set(late) == {"cheap"}
    assert outcome.branches == sum(n for _, n, *_ in calls)


def test_auto_refresh_is_windows_where_the_root_bounds_are_forward():
    deep, shallow = tiny_model(0, "point", 0.2, kind="deep"), tiny_model(0, "point", 0.2, kind="conv2")
    x = torch.full((1, *SHAPE), 0.5)
    for trained, forward in ((deep, True), (shallow, False)):
        options = reachable_options(trained.abstraction, x, 0.15)
        for refresh, windows in (("auto", forward), ("lirpa", False), ("windows", True)):
            bounder = HullBounder(trained, refresh=refresh)
            bounder.use_forward(*bounder.root_box(options))
            assert bounder.forward_on is forward
            assert bounder.windows_refresh() is windows, (refresh, forward)
        # α-CROWN on the root margins: by default only where the root bounds are forward; an explicit count wins
        from abscert_bench.verification.sound import ALPHA_ITERATIONS

        for steps, expected in ((None, ALPHA_ITERATIONS if forward else 0), (0, 0), (7, 7)):
            assert create_verifier("abscert-sound", alpha_iterations=steps).alpha_steps(bounder) == expected


@pytest.mark.parametrize("kind", ["fc", "conv2"])
def test_batched_crown_gives_the_same_bounds(kind):
    """crown_batch > 0 bounds the intermediate layers' unstable neurons a few at a time (auto_LiRPA's batched
    CROWN): the root margins equal the unbatched ones, and the batched path really ran."""
    trained = tiny_model(5, "point", 0.25 if kind == "conv2" else 0.2, kind=kind)
    eps = 0.08 if kind == "conv2" else 0.1
    x, y = labelled_batch(trained, eps, 5, n=3)
    options = reachable_options(trained.abstraction, x, eps)
    samples = np.arange(len(x))
    first, last = np.zeros_like(options.count), options.count - 1
    plain = HullBounder(trained, intermediate="backward").bound(options, samples, first, last, y)
    batched = HullBounder(trained, bound_opts={"crown_batch_size": 2}, intermediate="backward")
    calls = []
    original = batched.bounded.batched_backward
    object.__setattr__(batched.bounded, "batched_backward", lambda *a, **k: calls.append(1) or original(*a, **k))
    result = batched.bound(options, samples, first, last, y)
    assert calls, "the batched CROWN path was not taken"
    assert torch.allclose(result.margins, plain.margins, atol=1e-4, rtol=1e-5)


def test_refused_crown_pass_falls_back_to_batched_crown(monkeypatch):
    """A CROWN pass the memory budget refuses is run again with batched CROWN (FALLBACK_CROWN_BATCH neurons at
    a time): same margins, the batched path ran; after a refused batch the bounder is back to unbatched, after a
    refused single domain it stays batched."""
    from abscert_bench.budget import OutOfMemoryBudget
    from abscert_bench.sound import bounds as bounds_module

    monkeypatch.setattr(bounds_module, "FALLBACK_CROWN_BATCH", 2)
    trained = tiny_model(5, "point", 0.25, kind="conv2")
    x, y = labelled_batch(trained, 0.08, 5, n=3)
    options = reachable_options(trained.abstraction, x, 0.08)
    samples, first, last = np.arange(len(x)), np.zeros_like(options.count), options.count - 1
    plain = HullBounder(trained, intermediate="backward").bound(options, samples, first, last, y)
    bounder = HullBounder(trained, intermediate="backward")
    original, batched_calls = bounder.bounded.compute_bounds, []

    def refuse_unbatched(*args, **kwargs):
        if not np.isfinite(bounder.bounded.bound_opts["crown_batch_size"]):
            raise OutOfMemoryBudget("refused for the test")
        batched_calls.append(1)
        return original(*args, **kwargs)

    object.__setattr__(bounder.bounded, "compute_bounds", refuse_unbatched)
    result = bounder.bound(options, samples, first, last, y)
    assert batched_calls and torch.allclose(result.margins, plain.margins, atol=1e-4, rtol=1e-5)
    assert not bounder.batched and not np.isfinite(bounder.bounded.bound_opts["crown_batch_size"])  # a batch of 3
    single = bounder.bound(options, samples[:1], first[:1], last[:1], y[:1])  # one domain: batched from now on
    assert torch.allclose(single.margins, plain.margins[:1], atol=1e-4, rtol=1e-5)
    assert bounder.batched and bounder.bounded.bound_opts["crown_batch_size"] == 2


@pytest.mark.parametrize("kind,variant,d,eps,abs_eps", [
    ("deep", "point", 0.25, 0.08, 0.0), ("deep", "region", 0.25, 0.15, 0.05), ("fc", "point", 0.2, 0.15, 0.0),
    ("conv2", "point", 0.3, 0.1, 0.0)])
def test_forward_bounds_contain_every_vertex(kind, variant, d, eps, abs_eps):
    """Forward ReLU-input bounds (with back-substitution) hold at every vertex of the hull — the abstract
    inputs N really gets — on random option ranges; the first layer's are exact (an affine map of a box),
    and with back-substitution they are never looser than without."""
    from abscert_bench.sound import forward
    from abscert_bench.sound.attack import abstract_batch

    for seed in range(3):
        trained = tiny_model(seed, variant, d, abs_eps, kind)
        x, _ = labelled_batch(trained, eps, seed, n=4)
        options = reachable_options(trained.abstraction, x, eps)
        bounder = HullBounder(trained, intermediate="forward")
        rng = np.random.default_rng(seed)
        first = (rng.random(options.count.shape) * options.count).astype(np.int64)
        last = np.minimum(first + (rng.random(options.count.shape) < 0.7), options.count - 1)
        samples = np.arange(len(x))
        x_lo, x_hi, _ = bounder.box(options, samples, first, last)
        with torch.no_grad():
            bounds = bounder.forward.relu_inputs(x_lo, x_hi, [None] * len(bounder.relu_inputs))
            plain = bounder.forward.relu_inputs(x_lo, x_hi, [None] * len(bounder.relu_inputs), window=False)
            shallow = bounder.forward.relu_inputs(x_lo, x_hi, [None] * len(bounder.relu_inputs), depth=0,
                                                  window=False)
        assert len(bounds) == len(bounder.relu_inputs) >= 2
        for (lo, hi), (lo1, hi1), (lo0, hi0) in zip(bounds, plain, shallow):
            assert bool((lo >= lo1 - 1e-5).all() and (hi <= hi1 + 1e-5).all())
            assert bool((lo1 >= lo0 - 1e-5).all() and (hi1 <= hi0 + 1e-5).all())
        seen: list[list[torch.Tensor]] = [[] for _ in bounds]
        for i in samples:
            choices = np.stack([np.where(rng.random(first.shape[1]) < 0.5, first[i], last[i]) for _ in range(64)])
            z = abstract_batch(options, np.full(64, i), choices)
            c = z.shape[1] // 2
            h = torch.cat([z[:, :c], z[:, c:] - z[:, :c]], 1) if variant == "point" else z
            relu = 0
            with torch.no_grad():
                for layer in forward._layers(bounder.module):
                    if isinstance(layer, nn.ReLU):
                        lo, hi = bounds[relu]
                        assert bool((h >= lo[i] - 1e-5).all() and (h <= hi[i] + 1e-5).all()), (seed, relu)
                        seen[relu].append(torch.stack([h.min(0).values, h.max(0).values]))
                        relu += 1
                    h = layer(h)
        # the first ReLU's input is an affine map of the box: its bounds are exact, as interval arithmetic's are
        from abscert_bench.lirpa import bounded_input

        with torch.no_grad():
            bounder.bounded.compute_bounds(x=(bounded_input(x_lo, x_hi),), method="IBP")
        node = bounder.bounded[bounder.relu_inputs[0]]
        assert torch.allclose(bounds[0][0], node.lower, atol=1e-5) and torch.allclose(bounds[0][1], node.upper,
                                                                                       atol=1e-5)
        assert all(len(s) == len(samples) for s in seen)


def test_window_back_substitution_is_crown():
    """CROWN over receptive-field windows (`ForwardBounds._window_back`) on a strided, padded, asymmetric-kernel
    conv net: on every neuron it leaves unstable (those that went back to the input) it is at least as tight as
    auto_LiRPA's CROWN given the same earlier bounds, and its bounds hold on sampled inputs of the box."""
    from abscert_bench.lirpa import bounded_input
    from abscert_bench.lirpa_compat import lirpa
    from abscert_bench.sound.forward import ForwardBounds

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, 1, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, 2, 1), nn.ReLU(),
                        nn.Conv2d(6, 5, 3, 1, 1), nn.ReLU(), nn.Conv2d(5, 3, (3, 2), 1, (1, 0)), nn.ReLU(),
                        nn.Flatten(), nn.Linear(60, 4)).eval()
    x = torch.rand(3, 2, 9, 9)
    x_lo, x_hi = x - 0.05 * (torch.rand_like(x) > 0.5), x + 0.05
    chain = ForwardBounds.of(net)
    assert chain is not None
    with torch.no_grad():
        bounds = chain.relu_inputs(x_lo, x_hi, [None] * 4)
        samples = x_lo + (x_hi - x_lo) * torch.rand(256, *x.shape)
        relu_steps = [i for i, layer in enumerate(net) if isinstance(layer, nn.ReLU)]
        shapes, known, h = [], {}, x_lo
        for i, step in enumerate(chain.steps[:relu_steps[-1] + 1]):
            shapes.append(tuple(h.shape[1:]))
            if step is None:
                known[i] = tuple(t.flatten(1) for t in bounds[len(known)])
            else:
                h = step.apply(h, True)
        checked = 0
        for r in range(1, 4):
            sub = nn.Sequential(*list(net)[:relu_steps[r]], nn.Flatten())
            engine = lirpa().BoundedModule(sub, torch.zeros(1, 2, 9, 9))
            names = [node.inputs[0].name for node in engine._modules.values() if type(node).__name__ == "BoundRelu"]
            crown_lo, crown_hi = engine.compute_bounds(x=(bounded_input(x_lo, x_hi),), method="CROWN",
                                                       intermediate_layer_bounds=dict(zip(names, bounds[:r])))
            c, hh, ww = shapes[relu_steps[r]]
            n, size = len(x), c * hh * ww
            d, j = torch.arange(n).repeat_interleave(size), torch.arange(size).repeat(n)
            inf = torch.full((n * size,), float("inf"))
            lo, hi = chain._window_back(relu_steps[r], d, j // (hh * ww), j // ww % hh, j % ww, -inf, inf,
                                        x_lo, x_hi, shapes, known)
            lo, hi = lo.view(n, -1), hi.view(n, -1)
            unstable = (lo < 0) & (hi > 0)
            checked += int(unstable.sum())
            assert bool((lo[unstable] >= crown_lo[unstable] - 1e-5).all())
            assert bool((hi[unstable] <= crown_hi[unstable] + 1e-5).all())
            z = sub(samples.flatten(0, 1)).view(256, n, -1)
            assert bool((z >= lo - 1e-5).all() and (z <= hi + 1e-5).all())
        assert checked > 0


@pytest.mark.parametrize("kind", ["deep", "strided"])
def test_optimized_margins_start_at_crown_and_hold(kind):
    """α-CROWN on the margins over fixed ReLU-input bounds (`alpha.optimized_margins`): with no step it is
    auto_LiRPA's CROWN given the same ReLU-input bounds; optimised, it is never below that, raises some margin, and
    holds on sampled inputs of the box."""
    from abscert_bench.lirpa import bounded_input, margin_matrix
    from abscert_bench.lirpa_compat import lirpa
    from abscert_bench.sound.alpha import optimized_margins
    from abscert_bench.sound.forward import ForwardBounds

    torch.manual_seed(3)
    if kind == "deep":
        net = tiny_model(5, "point", 0.2, kind="deep").network
        x = torch.rand(4, *(2 * SHAPE[0], *SHAPE[1:]))
    else:
        net = nn.Sequential(nn.Conv2d(2, 4, 3, 1, 1), nn.ReLU(), nn.Conv2d(4, 6, 4, 2, 1), nn.ReLU(), nn.Flatten(),
                            nn.Linear(6 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, CLASSES)).eval()
        x = torch.rand(4, 2, 8, 8)
    x_lo, x_hi = x - 0.3 * torch.rand_like(x), x + 0.3 * torch.rand_like(x)
    chain = ForwardBounds.of(net)
    assert chain is not None
    labels = torch.arange(len(x)) % CLASSES
    spec = margin_matrix(labels, CLASSES)
    with torch.no_grad():
        relu_bounds = chain.relu_inputs(x_lo, x_hi, [None] * chain.relus)
        engine = lirpa().BoundedModule(net, torch.zeros(1, *x.shape[1:]))
        names = [node.inputs[0].name for node in engine._modules.values() if type(node).__name__ == "BoundRelu"]
        crown, _ = engine.compute_bounds(x=(bounded_input(x_lo, x_hi),), C=spec, method="CROWN", bound_upper=False,
                                         intermediate_layer_bounds=dict(zip(names, relu_bounds)))
    start = optimized_margins(chain, x_lo, x_hi, relu_bounds, spec, 0)
    assert torch.allclose(start, crown, atol=1e-4, rtol=1e-5)
    tuned = optimized_margins(chain, x_lo, x_hi, relu_bounds, spec, 30)
    assert bool((tuned >= crown - 1e-4).all())
    assert float((tuned - crown).max()) > 1e-3, "the slopes should move some margin"
    with torch.no_grad():
        samples = x_lo + (x_hi - x_lo) * torch.rand(512, *x.shape)
        logits = net(samples.flatten(0, 1)).view(512, len(x), -1)
        margins = torch.einsum("nsk,bnk->bns", spec, logits)
    assert bool((margins >= tuned - 1e-4).all())


@pytest.mark.parametrize("geometry", [dict(kernel_size=4, stride=2, padding=1), dict(kernel_size=3, stride=2),
                                      dict(kernel_size=(3, 2), stride=(1, 3), padding=(2, 0)),
                                      dict(kernel_size=3, padding=2, dilation=2), dict(kernel_size=3, groups=2)])
def test_convolution_steps_back(geometry):
    """A convolution's backward steps: `back` is Λ·W onto the input's size (torch's conv2d_input, odd sizes
    included); `unit` (one group, no dilation) is `window` of unit rows, and is absent otherwise."""
    from torch.nn.grad import conv2d_input

    from abscert_bench.sound.forward import _affine

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **geometry)
    step = _affine(conv)
    assert step is not None and step.window is not None
    x = torch.rand(1, 4, 11, 12)
    lam = torch.randn(5, *conv(x).shape[1:])
    settings = (conv.stride, conv.padding, conv.dilation, conv.groups)
    assert torch.allclose(step.back(lam, tuple(x.shape[1:])), conv2d_input((5, *x.shape[1:]), conv.weight, lam,
                                                                             *settings), atol=1e-5)
    if conv.groups > 1 or conv.dilation != (1, 1):
        assert step.unit is None
        return
    assert step.unit is not None
    channels, top, left = torch.tensor([0, 5, 2]), torch.tensor([0, 3, 1]), torch.tensor([2, 0, 4])
    rows = torch.zeros(3, 6, 1, 1)
    rows[torch.arange(3), channels] = 1.0
    for got, want in zip(step.unit(channels, top, left), step.window(rows, top, left)):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)


def test_dense_back_substitution_after_windows_is_crown():
    """After conv layers with windows, a dense layer's unstable neurons are back-substituted to the input: on every
    neuron left unstable its bounds are at least as tight as auto_LiRPA's CROWN given the same earlier bounds, and
    they hold on sampled inputs of the box."""
    from abscert_bench.lirpa import bounded_input
    from abscert_bench.lirpa_compat import lirpa
    from abscert_bench.sound.forward import ForwardBounds

    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, 1, 1), nn.ReLU(), nn.Conv2d(4, 4, 4, 2, 1), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, 1, 1), nn.ReLU(), nn.Flatten(), nn.Linear(96, 40), nn.ReLU(),
                        nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 3)).eval()
    x = torch.rand(3, 2, 8, 8)
    x_lo, x_hi = x - 0.08 * (torch.rand_like(x) > 0.3), x + 0.08 * (torch.rand_like(x) > 0.3)
    chain = ForwardBounds.of(net)
    assert chain is not None
    relu_at = [i for i, layer in enumerate(net) if isinstance(layer, nn.ReLU)]
    samples = x_lo + (x_hi - x_lo) * torch.rand(256, *x.shape)
    checked = 0
    with torch.no_grad():
        bounds = chain.relu_inputs(x_lo, x_hi, [None] * 5)
        for r in (3, 4):
            sub = nn.Sequential(*list(net)[:relu_at[r]])
            engine = lirpa().BoundedModule(sub, torch.zeros(1, 2, 8, 8))
            names = [node.inputs[0].name for node in engine._modules.values() if type(node).__name__ == "BoundRelu"]
            crown_lo, crown_hi = engine.compute_bounds(x=(bounded_input(x_lo, x_hi),), method="CROWN",
                                                       intermediate_layer_bounds=dict(zip(names, bounds[:r])))
            lo, hi = bounds[r]
            unstable = (lo < 0) & (hi > 0)
            checked += int(unstable.sum())
            assert bool((lo[unstable] >= crown_lo[unstable] - 1e-5).all())
            assert bool((hi[unstable] <= crown_hi[unstable] + 1e-5).all())
            z = sub(samples.flatten(0, 1)).view(256, len(x), -1)
            assert bool((z >= lo - 1e-5).all() and (z <= hi + 1e-5).all())
    assert checked > 0


def test_refreshed_bounds_are_crown_of_the_parents_unstable_neurons():
    """`ForwardBounds.refreshed` (branch and bound's 'windows' refresh) on a child box with its parent's bounds: inside
    the parent's bounds, at least as tight as auto_LiRPA's CROWN given the same earlier bounds on every neuron it
    leaves unstable, and sound on sampled inputs of the child box."""
    from abscert_bench.lirpa import bounded_input
    from abscert_bench.lirpa_compat import lirpa
    from abscert_bench.sound.forward import ForwardBounds

    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, 1, 1), nn.ReLU(), nn.Conv2d(4, 5, 4, 2, 1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(80, 30), nn.ReLU(), nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 3)).eval()
    x = torch.rand(3, 2, 8, 8)
    x_lo, x_hi = x - 0.1 * (torch.rand_like(x) > 0.3), x + 0.1 * (torch.rand_like(x) > 0.3)
    child_hi = torch.where(torch.rand_like(x) > 0.5, (x_lo + x_hi) / 2, x_hi)  # a child: some coordinates halved
    chain = ForwardBounds.of(net)
    assert chain is not None
    relu_at = [i for i, layer in enumerate(net) if isinstance(layer, nn.ReLU)]
    samples = x_lo + (child_hi - x_lo) * torch.rand(256, *x.shape)
    checked = 0
    with torch.no_grad():
        parent = chain.relu_inputs(x_lo, x_hi, [None] * 4, window=False)
        bounds = chain.refreshed(x_lo, child_hi, parent)
        assert bounds is not None
        for r in range(4):
            lo, hi = bounds[r]
            assert bool((lo >= parent[r][0]).all() and (hi <= parent[r][1]).all())
            sub = nn.Sequential(*list(net)[:relu_at[r]], nn.Flatten())
            z = sub(samples.flatten(0, 1)).view(256, *lo.shape)
            assert bool((z >= lo - 1e-5).all() and (z <= hi + 1e-5).all())
            if r == 0:
                continue
            engine = lirpa().BoundedModule(sub, torch.zeros(1, 2, 8, 8))
            names = [node.inputs[0].name for node in engine._modules.values() if type(node).__name__ == "BoundRelu"]
            crown_lo, crown_hi = engine.compute_bounds(x=(bounded_input(x_lo, child_hi),), method="CROWN",
                                                       intermediate_layer_bounds=dict(zip(names, bounds[:r])))
            unstable = (lo < 0) & (hi > 0)
            checked += int(unstable.sum())
            assert bool((lo[unstable] >= crown_lo.view_as(lo)[unstable] - 1e-5).all())
            assert bool((hi[unstable] <= crown_hi.view_as(hi)[unstable] + 1e-5).all())
    assert checked > 0


def dense_second_layer_crown(net: nn.Sequential, x_lo: torch.Tensor, x_hi: torch.Tensor):
    """Reference: CROWN bounds (float64, dense matrices) of the second convolution of Conv, ReLU, Conv, …, with the
    textbook relaxation of the exact first-layer bounds (upper chord; lower slope 1 where u >= -l, else 0)."""
    first, second = (copy.deepcopy(net[i]).double() for i in (0, 2))
    size = x_lo[0].numel()
    basis = torch.eye(size, dtype=torch.float64).view(size, *x_lo.shape[1:])
    z1_bias = first(torch.zeros(1, *x_lo.shape[1:], dtype=torch.float64))
    w1 = (first(basis) - z1_bias).flatten(1).T
    hidden = z1_bias[0].numel()
    basis = torch.eye(hidden, dtype=torch.float64).view(hidden, *z1_bias.shape[1:])
    z2_bias = second(torch.zeros_like(z1_bias))
    w2 = (second(basis) - z2_bias).flatten(1).T
    out = []
    for lo, hi in zip(x_lo.double().flatten(1), x_hi.double().flatten(1)):
        centre, radius = (lo + hi) / 2, (hi - lo) / 2
        z1 = w1 @ centre + z1_bias.flatten()
        l1, u1 = z1 - w1.abs() @ radius, z1 + w1.abs() @ radius
        unstable = (l1 < 0) & (u1 > 0)
        slope = torch.where(unstable, u1 / (u1 - l1), (l1 >= 0).double())
        shift = torch.where(unstable, -slope * l1, 0.0)
        alpha = torch.where(unstable, (u1 >= -l1).double(), (l1 >= 0).double())
        bounds = []
        for low, high in ((alpha, slope), (slope, alpha)):  # lower bound, then upper bound
            d = w2.clamp(min=0) * low + w2.clamp(max=0) * high
            intercept = (w2.clamp(max=0) if low is alpha else w2.clamp(min=0)) @ shift
            value = z2_bias.flatten() + intercept + d @ z1
            spread = (d @ w1).abs() @ radius
            bounds.append(value - spread if low is alpha else value + spread)
        out.append(bounds)
    return [torch.stack([b[i] for b in out]).view(len(x_lo), *z2_bias.shape[1:]) for i in (0, 1)]


@pytest.mark.parametrize("geometry", [(4, 2, 1, 4, 1, 1), (3, 1, 1, 4, 2, 1), (3, 1, 0, 3, 1, 0), (3, 2, 2, 3, 2, 0),
                                      (2, 1, 1, 2, 1, 0)])
def test_second_layer_bounds_are_crown(geometry, monkeypatch):
    """`SecondLayerBounds` (branch and bound's 'second-conv' refresh): exactly CROWN's bounds on the second
    convolution (a float64 dense reference), never looser than auto_LiRPA's CROWN, sound on sampled inputs; with a
    parent's bounds, inside them and recomputed only where they leave a neuron unstable."""
    from abscert_bench.lirpa import bounded_input
    from abscert_bench.lirpa_compat import lirpa
    from abscert_bench.sound.second import SecondLayerBounds

    k1, s1, p1, k2, s2, p2 = geometry
    torch.manual_seed(sum(geometry))
    net = nn.Sequential(nn.Conv2d(2, 4, k1, s1, p1), nn.ReLU(), nn.Conv2d(4, 5, k2, s2, p2), nn.ReLU(),
                        nn.Flatten()).eval()
    x = torch.rand(3, 2, 11, 10)
    x_lo, x_hi = x - 0.1 * (torch.rand_like(x) > 0.6), x + 0.1 * (torch.rand_like(x) > 0.6)
    helper = SecondLayerBounds.of(net)
    assert helper is not None
    (l1, u1), (l2, u2) = helper.bounds(x_lo, x_hi)
    ref_lo, ref_hi = dense_second_layer_crown(net, x_lo, x_hi)
    assert torch.allclose(l2.double(), ref_lo, atol=1e-5) and torch.allclose(u2.double(), ref_hi, atol=1e-5)
    engine = lirpa().BoundedModule(net, torch.zeros(1, 2, 11, 10))
    engine.compute_bounds(x=(bounded_input(x_lo, x_hi),), method="CROWN")
    names = [node.inputs[0].name for node in engine._modules.values() if type(node).__name__ == "BoundRelu"]
    first_lo, first_hi = engine[names[0]].lower, engine[names[0]].upper
    assert torch.allclose(l1, first_lo, atol=1e-5) and torch.allclose(u1, first_hi, atol=1e-5)
    assert bool((l2 >= engine[names[1]].lower - 1e-5).all() and (u2 <= engine[names[1]].upper + 1e-5).all())
    # rows in chunks (a tiny CHUNK_MB: a few rows each), each announced to the limits' check first: the same bounds
    import abscert_bench.sound.second as second_module

    monkeypatch.setattr(second_module, "CHUNK_MB", 0.01)
    estimates: list[float] = []
    chunked_lo, chunked_hi = helper.bounds(x_lo, x_hi, check=estimates.append)[1]
    assert len(estimates) > 1 and min(estimates) > 0
    assert torch.allclose(chunked_lo, l2, atol=1e-6) and torch.allclose(chunked_hi, u2, atol=1e-6)
    monkeypatch.undo()
    samples = x_lo + (x_hi - x_lo) * torch.rand(256, *x.shape)
    with torch.no_grad():
        z2 = net[:3](samples.flatten(0, 1)).view(256, *l2.shape)
    assert bool((z2 >= l2 - 1e-5).all() and (z2 <= u2 + 1e-5).all())
    # a child (some coordinates halved) with the parent's bounds: inside them, and only the neurons they leave
    # unstable recomputed
    child_hi = torch.where(torch.rand_like(x) > 0.5, (x_lo + x_hi) / 2, x_hi)
    parent = [(l1, u1), (l2 - 0.01, u2 + 0.01)]
    (c1_lo, c1_hi), (c2_lo, c2_hi) = helper.bounds(x_lo, child_hi, parent)
    assert bool((c1_lo >= l1).all() and (c1_hi <= u1).all() and (c2_lo >= parent[1][0]).all()
                and (c2_hi <= parent[1][1]).all())
    kept = ~((parent[1][0] < 0) & (parent[1][1] > 0))
    assert bool(kept.any()) and bool((c2_lo[kept] == parent[1][0][kept]).all())
    fresh_lo, fresh_hi = helper.bounds(x_lo, child_hi)[1]
    unstable = ~kept
    assert torch.allclose(c2_lo[unstable], torch.maximum(fresh_lo, parent[1][0])[unstable], atol=1e-6)
    assert torch.allclose(c2_hi[unstable], torch.maximum(torch.minimum(fresh_hi, parent[1][1]), c2_lo)[unstable],
                          atol=1e-6)


def test_second_conv_refresh_needs_two_convolutions(monkeypatch):
    """'second-conv' takes networks that start Conv, ReLU, Conv, ReLU (BatchNorm between, or a dense start, keep
    auto_LiRPA's refresh), and branch and bound's refreshes go through it there."""
    from abscert_bench.sound.second import SecondLayerBounds

    for kind in ("fc", "conv", "deep"):
        assert HullBounder(tiny_model(0, "point", 0.25, kind=kind), refresh="second-conv").second is None
    assert HullBounder(tiny_model(0, "point", 0.25, kind="conv2")).second is None  # only when asked for
    trained = tiny_model(1, "point", 0.25, kind="conv2")
    assert HullBounder(trained, refresh="second-conv").second is not None
    calls = []
    original = SecondLayerBounds.bounds
    monkeypatch.setattr(SecondLayerBounds, "bounds", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    for seed in range(3):
        x, y = labelled_batch(trained, 0.08, seed)
        create_verifier("abscert-sound", **EXTRA_MODES["second-conv"]).verify(trained, x, y, 0.08)
    assert calls, "no branch-and-bound refresh went through SecondLayerBounds"


def test_forward_mode_needs_a_chain():
    """intermediate='forward' on a network it cannot walk is an error; 'auto' falls back to CROWN."""
    trained = tiny_model(0, "point", 0.3, kind="unfoldable")
    with pytest.raises(ValueError):
        HullBounder(trained, intermediate="forward")
    assert HullBounder(trained).forward is None
    assert HullBounder(tiny_model(0, "point", 0.2, kind="deep"), intermediate="backward").forward is None


def test_bad_input():
    trained = tiny_model(0, "point", 0.2)
    x, y = labelled_batch(trained, 0.1, 0, n=2)
    verifier = create_verifier("abscert-sound")
    for eps in (-0.1, 1.5, float("nan")):
        with pytest.raises(UserError):
            verifier.verify(trained, x, y, eps)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(UserError):
        verifier.verify(trained, bad, y, 0.1)
    with pytest.raises(UserError):
        verifier.verify(trained, x.repeat(1, 2, 1, 1), y, 0.1)  # wrong channel count
    with pytest.raises(UserError):
        verifier.verify(trained, x * 2, y, 0.1)  # pixels outside [0,1]
    with pytest.raises(UserError):
        Abstraction("point", 0.0)
    broken = tiny_model(0, "point", 0.2)
    object.__setattr__(broken.abstraction, "d", -1.0)
    with pytest.raises(UserError):
        verifier.verify(broken, x, y, 0.1)
    standard = TrainedModel(trained.network, {**trained.model_config, "abstraction": None}, None)
    with pytest.raises(UserError):
        verifier.verify(standard, x, y, 0.1)
    for options in ({"timeout": 0}, {"bound_method": "nope"}, {"enumerate_limit": -1}, {"crown_batch": -1},
                    {"crown_batch": 1.5}, {"crown_batch": True}, {"intermediate": "sideways"},
                    {"alpha_iterations": -1}, {"bab_alpha": -2}):
        with pytest.raises(UserError):
            create_verifier("abscert-sound", **options)


def test_recheck_rejects_non_counterexamples():
    trained = edge_model()
    x = torch.full(SHAPE, 0.5)
    x[0, 0, 0] = 0.19
    good = x.clone()
    good[0, 0, 0] = 0.2
    assert recheck_counterexample(trained, x, 0, 0.05, good)[0]
    assert not recheck_counterexample(trained, x, 0, 0.05, x)[0]  # classified correctly
    far = good.clone()
    far[0, 1, 1] = 0.6  # outside the ball
    assert "outside the ball" in recheck_counterexample(trained, x, 0, 0.05, far)[1]
    assert not recheck_counterexample(trained, x, 0, 0.0099, good)[0]
    assert not recheck_counterexample(trained, x, 0, 0.05, good[None])[0]  # wrong shape


def test_trained_digits_model(runs, digits):
    """On a trained AbsCert model: re-checked counterexamples; sound-verified ⇒ paper-verified (d >= 2·eps)."""
    from abscert_bench.trained import load_checkpoint

    trained = load_checkpoint(runs["abscert"])
    x, y = digits.test_x[:24], digits.test_y[:24]
    sound = create_verifier("abscert-sound", timeout=3).verify(trained, x, y, 0.1)
    paper = create_verifier("abscert-paper").verify(trained, x, y, 0.1)
    for s, p in zip(sound, paper):
        if s.status == "verified":
            assert p.status == "verified"
        if s.status == "falsified":
            ok, message = recheck_counterexample(trained, x[s.index], int(y[s.index]), 0.1, s.counterexample)
            assert ok, message
    assert any(s.status != "unknown" for s in sound)


def test_counterexample_file_round_trip(tmp_path):
    abstraction = Abstraction("point", 0.2)
    config = {"model": "fc3", "input_shape": list(SHAPE), "num_classes": CLASSES, "activation": "relu",
              "abstraction": abstraction.to_dict()}
    torch.manual_seed(0)
    network = build_network(config).eval()
    trained = TrainedModel(network, config, abstraction)
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(trained, checkpoint)
    x, y = labelled_batch(trained, 0.15, 5, n=8)
    results = create_verifier("abscert-sound").verify(trained, x, y, 0.15)
    written = save_counterexamples(tmp_path / "cex.npz", results, x, 0.15)
    assert written == sum(r.status == "falsified" for r in results)
    report = recheck_file(checkpoint, tmp_path / "cex.npz")
    assert len(report) == written and all(row["ok"] for row in report)
    # a tampered counterexample fails
    data = dict(np.load(tmp_path / "cex.npz"))
    if written:
        data["x_adv"] = data["x"].copy()
        np.savez(tmp_path / "bad.npz", **data)
        assert not any(row["ok"] for row in recheck_file(checkpoint, tmp_path / "bad.npz"))
    np.savez(tmp_path / "partial.npz", index=np.zeros(1))
    with pytest.raises(UserError):
        recheck_file(checkpoint, tmp_path / "partial.npz")
    with pytest.raises(UserError):
        recheck_file(checkpoint, tmp_path / "missing.npz")


@pytest.mark.parametrize("seed", [17, 21, 33])
def test_reused_verifier_sees_in_place_weight_changes(seed):
    """A verifier reused after an in-place edit that keeps every parameter's sum (a permutation of the
    first layer's rows, written with .data.copy_, so no version counter moves) answers like a fresh one."""
    trained = tiny_model(seed, "point", 0.2, kind="fc")
    x, y = labelled_batch(trained, 0.1, seed, n=6)
    options = {"enumerate_limit": 0, "attack": False}  # bounds and BaB decide
    reused = create_verifier("abscert-sound", **options)
    before = [r.status for r in reused.verify(trained, x, y, 0.1)]
    layer = trained.network[1]
    perm = torch.randperm(layer.out_features, generator=torch.Generator().manual_seed(seed))
    sums = [float(p.detach().double().sum()) for p in trained.network.parameters()]
    layer.weight.data.copy_(layer.weight.data[perm].clone())
    layer.bias.data.copy_(layer.bias.data[perm].clone())
    assert [float(p.detach().double().sum()) for p in trained.network.parameters()] == pytest.approx(sums, abs=1e-9)
    fresh = [r.status for r in create_verifier("abscert-sound", **options).verify(trained, x, y, 0.1)]
    assert fresh != before  # the edit changes answers, so a stale engine would show
    assert [r.status for r in reused.verify(trained, x, y, 0.1)] == fresh


def _stopped_after(call, limit: int, error: Exception):
    """`call`, raising `error` from its (limit + 1)-th use on."""
    uses = itertools.count(1)

    def wrapped(*args, **kwargs):
        if next(uses) > limit:
            raise error
        return call(*args, **kwargs)

    return wrapped


def worst_margin(trained: TrainedModel, x: torch.Tensor, y: int, eps: float) -> float:
    """min over every reachable abstract input z of N(z)_y - max_{j≠y} N(z)_j, by enumeration."""
    c, h, w = SHAPE
    per_pixel = [pixel_pairs(trained.abstraction, float(v), eps) for v in x.reshape(-1)]
    combos = np.array(list(itertools.product(*per_pixel)), dtype=np.float32)
    z = np.concatenate([combos[:, :, 0], combos[:, :, 1]], axis=1).reshape(-1, 2 * c, h, w)
    with torch.no_grad():
        logits = trained.network(torch.from_numpy(z))
    return float(margins_from_logits(logits, torch.full((len(z),), y)).min())


@pytest.mark.parametrize("kind,bound_method", [("fc", "ibp"), ("fc", "crown"), ("deep", "crown")])
def test_margin_bracket_holds(kind, bound_method):
    """`attack_margin` is never below a sample's worst margin and `min_margin_lb` never above it, also when branch and
    bound is cut off and raises the lower bound from its open domains."""
    from abscert_bench.budget import BoundTimeout
    from abscert_bench.sound.search import branch_and_bound

    eps, checked, raised = 0.15, 0, 0
    for seed in range(4):
        trained = tiny_model(seed, "point", 0.2, kind=kind)
        x = torch.full((1, *SHAPE), 0.5)  # every pixel has three cells: 3^9 reachable abstract inputs
        with torch.no_grad():
            y = int(trained.classifier()(x).argmax(1)[0])
        truth = worst_margin(trained, x[0], y, eps)
        result = create_verifier("abscert-sound", enumerate_limit=0, bound_method=bound_method).verify(
            trained, x, torch.tensor([y]), eps)[0]
        assert result.details["attack_margin"] >= truth - 1e-4, (seed, result.details, truth)
        if "min_margin_lb" in result.details:
            assert result.details["min_margin_lb"] <= truth + 1e-4, (seed, result.details, truth)
        # a search cut off after a few calls: its lower bound holds and is never below the root's
        options = reachable_options(trained.abstraction, x, eps)
        bounder = HullBounder(trained, method=bound_method)
        labels = torch.tensor([y])
        root = bounder.bound(options, np.array([0]), np.zeros((1, 9), dtype=np.int64), options.count - 1, labels)
        if bool((root.margins > 0).all()):
            continue
        bounder.bound = _stopped_after(bounder.bound, 8, BoundTimeout("stopped"))
        outcome = branch_and_bound(bounder, trained.network, options, 0, y, root, float("inf"), batch=4,
                                   enumerate_limit=1)
        if outcome.status != "unknown":
            continue
        floor = outcome.notes["margin_lb"]
        assert float(root.margins.min()) - 1e-6 <= floor <= truth + 1e-4, (seed, floor, truth)
        checked += 1
        raised += floor > float(root.margins.min()) + 1e-6
    assert checked, "some search should end open"
    if bound_method != "ibp":
        assert raised, "the open domains' bound should rise above the root's somewhere"


def test_bracket_reports_the_medians_of_both_ends():
    from abscert_bench.sound_report import bracket

    assert bracket([]) == "–" and bracket([(None, 1.0)]) == "–"
    assert bracket([(-1.0, 2.0), ("-3", "4"), ("", 0.5)]) == "[-2.00, 2.00]"  # CSV strings, a missing lower end
