"""Time and memory limits of bound computations: the guard, the planner, and the verifiers' unknown answers."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from abscert_bench import budget
from abscert_bench.budget import BatchPlanner, BoundTimeout, Limits, MemoryWatch, OutOfMemoryBudget, guarded, limited
from abscert_bench.errors import UserError
from abscert_bench.lirpa_compat import lirpa
from abscert_bench.trained import TrainedModel
from abscert_bench.verification import create_verifier

from test_sound import labelled_batch, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_memory_watch_sees_an_allocation():
    with MemoryWatch("cpu", budget_mb=50) as watch:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        time.sleep(0.05)
        del block
    assert watch.peak_mb > 40 and watch.exceeded
    with MemoryWatch("cpu", budget_mb=1e6) as quiet:
        pass
    assert not quiet.exceeded


def small_bounded():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    lib = lirpa()
    bounded = lib.BoundedModule(net, torch.zeros(1, 4))
    x = torch.zeros(2, 4)
    inputs = (lib.BoundedTensor(x, lib.PerturbationLpNorm(norm=float("inf"), x_L=x - 0.1, x_U=x + 0.1)),)
    return bounded, inputs


def test_guard_stops_crown_past_the_deadline_and_the_budget():
    bounded, inputs = small_bounded()
    limits = guarded(bounded)
    assert guarded(bounded) is limits  # one guard per module
    lower, _ = bounded.compute_bounds(x=inputs, method="CROWN")  # no block open: no limit
    with pytest.raises(BoundTimeout):
        with limited(limits, deadline=time.perf_counter() - 1.0):
            bounded.compute_bounds(x=inputs, method="CROWN")
    with pytest.raises(OutOfMemoryBudget):
        with limited(limits, budget_mb=1.0) as watch:
            watch.exceeded = True
            bounded.compute_bounds(x=inputs, method="CROWN")
    assert limits.active == []
    again, _ = bounded.compute_bounds(x=inputs, method="CROWN")  # a stopped call leaves the module usable
    assert torch.equal(lower, again)


def _allocated_mb(value, seen: set) -> float:
    """MiB of the distinct storages of the tensors (and Patches) in a backward step's result."""
    if isinstance(value, (list, tuple)):
        return sum(_allocated_mb(v, seen) for v in value)
    tensor = value if isinstance(value, torch.Tensor) else getattr(value, "patches", None)
    if not isinstance(tensor, torch.Tensor) or tensor.untyped_storage().data_ptr() in seen:
        return 0.0
    seen.add(tensor.untyped_storage().data_ptr())
    return tensor.untyped_storage().nbytes() / 2**20


@pytest.mark.parametrize("model", ["dm_small", "fc3"])
def test_backward_step_estimate_covers_what_each_step_allocates(model):
    """The pre-step estimate is at least the memory of the A matrices each CROWN backward step returns (dense
    matrices, Patches, identity Patches), so the guard can refuse a step before it allocates."""
    from abscert_bench.lirpa import bounded_module, margin_lower_bounds
    from abscert_bench.models import create_model

    torch.manual_seed(0)
    net = create_model(model, (1, 28, 28), 10).eval()
    bounded = bounded_module(net, torch.zeros(1, 1, 28, 28))
    steps: list[tuple[str, float, float]] = []
    for node in bounded._modules.values():
        if hasattr(node, "bound_backward"):
            def probe(*args, _original=node.bound_backward, _node=node, **kwargs):
                estimate = budget.backward_step_mb(_node, args[0], args[1])
                result = _original(*args, **kwargs)
                seen = {t.untyped_storage().data_ptr() for t in (list(args[:2]) + [p.lower for p in args[2:]
                        if isinstance(getattr(p, "lower", None), torch.Tensor)]) if isinstance(t, torch.Tensor)}
                seen |= {a.patches.untyped_storage().data_ptr() for a in args[:2]
                         if getattr(a, "patches", None) is not None}
                steps.append((type(_node).__name__, estimate, _allocated_mb(result[0], seen)))
                return result
            object.__setattr__(node, "bound_backward", probe)
    x = torch.rand(1, 1, 28, 28)
    margin_lower_bounds(bounded, (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1), torch.tensor([3]), 10, "crown")
    assert len(steps) > 10 and sum(made for _, _, made in steps) > 1.0
    for kind, estimate, made in steps:
        assert estimate >= made - 1e-6, (kind, estimate, made)


def test_guard_refuses_a_step_that_would_pass_the_budget(monkeypatch):
    """A backward step whose estimate would take the growth past the budget stops before it runs."""
    bounded, inputs = small_bounded()
    monkeypatch.setattr(budget, "backward_step_mb", lambda node, la, ua: 0.0 if node is None else 10.0)
    calls = []
    for node in bounded._modules.values():  # count the steps that really run (inside the guard's check)
        if type(node).__name__ == "BoundLinear":
            inner = node.bound_backward
            object.__setattr__(node, "bound_backward", lambda *a, _inner=inner, **k: calls.append(1) or _inner(*a, **k))
    limits = guarded(bounded)
    with limited(limits, budget_mb=1e6):  # the estimate fits: the bound runs
        bounded.compute_bounds(x=inputs, method="CROWN")
    assert calls
    calls.clear()
    with pytest.raises(OutOfMemoryBudget, match="next backward step"):
        with limited(limits, budget_mb=5.0):
            bounded.compute_bounds(x=inputs, method="CROWN")
    assert not calls  # refused before the first step, not after it


def test_nested_blocks_keep_the_outer_deadline():
    limits = Limits()
    with limited(limits, deadline=time.perf_counter() - 1.0):
        with limited(limits, deadline=None):
            with pytest.raises(BoundTimeout):
                limits.check()


def test_planner_learns_batch_sizes_and_retries_smaller(monkeypatch):
    planner = BatchPlanner(100.0, Limits())
    assert planner.size(8) == 1  # nothing measured yet
    planner.record(10.0, 1)
    assert planner.size(64) == 8  # 100 / (10 · 1.25)
    planner.record(5.0, 1)
    assert planner.size(64) == 8  # the largest per-item figure wins
    sizes = []

    def fn(chunk):
        sizes.append(len(chunk))
        if len(chunk) > 2:
            raise MemoryError("no room")
        return [2 * v for v in chunk]

    out = list(planner.chunks(fn, list(range(10)), 8))
    assert sizes[:3] == [8, 4, 2] and max(sizes[3:]) <= 2  # halved until it fits, then kept there
    assert [v for _, r in out for v in r] == [2 * v for v in range(10)]

    def never(chunk):
        raise MemoryError("never fits")

    (chunk, result), *_ = list(BatchPlanner(100.0, Limits()).chunks(never, [7, 8], 4))
    assert chunk == [7] and isinstance(result, MemoryError)

    def other(chunk):
        raise ValueError("a bug, not a limit")

    with pytest.raises(ValueError):
        list(planner.chunks(other, [1], 4))


def test_abscert_sound_root_bound_past_the_timeout_is_unknown():
    trained = tiny_model(2, "point", 0.2, kind="fc")
    x = torch.full((2, 1, 3, 3), 0.5)  # every pixel a choice pixel
    with torch.no_grad():
        y = trained.classifier()(x).argmax(1)
    verifier = create_verifier("abscert-sound", timeout=1e-9, enumerate_limit=0, attack=False, fast_first=False)
    for result in verifier.verify(trained, x, y, 0.15):
        assert result.status == "unknown" and result.details["stage"] == "timeout"
        assert "root bound stopped" in result.details["note"]


def test_abscert_sound_out_of_memory_is_unknown(monkeypatch):
    trained = tiny_model(2, "point", 0.2, kind="fc")
    x = torch.full((2, 1, 3, 3), 0.5)
    with torch.no_grad():
        y = trained.classifier()(x).argmax(1)
    monkeypatch.setattr(MemoryWatch, "_growth", lambda self: 1e9)  # every bound looks too big
    verifier = create_verifier("abscert-sound", enumerate_limit=0, attack=False, memory_mb=10)
    for result in verifier.verify(trained, x, y, 0.15):
        assert result.status == "unknown" and result.details["stage"] == "memory"


def standard_model() -> TrainedModel:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(9, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    config = {"model": "tiny", "input_shape": [1, 3, 3], "num_classes": 3, "activation": "relu"}
    return TrainedModel(net.eval(), config, None)


def standard_batch(n: int, seed: int) -> tuple[TrainedModel, torch.Tensor, torch.Tensor]:
    """standard_model() with n random images labelled by its own predictions."""
    trained = standard_model()
    x = torch.rand(n, 1, 3, 3, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = trained.network(x).argmax(1)
    return trained, x, y


@pytest.mark.parametrize("name", ["crown", "alpha-crown"])
def test_bound_verifiers_batch_by_memory_and_fall_back(name, monkeypatch):
    trained, x, y = standard_batch(6, 0)
    plain = [r.status for r in create_verifier(name).verify(trained, x, y, 0.01)]
    assert plain.count("verified") >= 3
    calls = []
    original = budget.BatchPlanner.call

    def spy(self, fn, items=1, deadline=None):
        calls.append(items)
        return original(self, fn, items, deadline)

    monkeypatch.setattr(budget.BatchPlanner, "call", spy)
    planned = [r.status for r in create_verifier(name, memory_mb=1e6).verify(trained, x, y, 0.01)]
    assert planned == plain and calls[0] == 1 and max(calls) > 1  # one sample first, then planned batches
    # every full bound runs out of memory: the IBP-intermediate cascade answers (sound, looser)
    monkeypatch.setattr(budget.BatchPlanner, "call", original)

    def too_big(self, *args, **kwargs):
        raise OutOfMemoryBudget("simulated")

    monkeypatch.setattr(type(create_verifier(name)), "margins", too_big)
    cascade = create_verifier(name).verify(trained, x, y, 0.01)
    assert any(r.status == "verified" for r in cascade)
    for r, p in zip(cascade, plain):
        if r.status == "verified":
            assert p == "verified" and r.details["bound"] == "ibp-intermediate"  # looser never verifies more
        else:
            assert r.status in ("unknown", "falsified")


EPS_MIXED = 0.2  # some samples verified, some not, on standard_model()


@pytest.mark.parametrize("name", ["crown", "alpha-crown"])
def test_bound_verifiers_batched_crown_gives_the_same_margins(name, monkeypatch):
    """crown_batch: auto_LiRPA's batched CROWN (intermediate neurons a few at a time) bounds like plain CROWN."""
    trained, x, y = standard_batch(8, 1)
    plain = create_verifier(name).verify(trained, x, y, EPS_MIXED)
    calls = []
    original = lirpa().BoundedModule.batched_backward
    monkeypatch.setattr(lirpa().BoundedModule, "batched_backward",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    batched = create_verifier(name, crown_batch=3).verify(trained, x, y, EPS_MIXED)
    assert calls, "the batched CROWN path was not taken"
    assert [r.status for r in batched] == [r.status for r in plain]
    assert {"verified", "unknown"} <= {r.status for r in plain}
    for b, p in zip(batched, plain):
        if "min_margin_lb" in p.details:
            assert b.details["min_margin_lb"] == pytest.approx(p.details["min_margin_lb"], abs=1e-4, rel=1e-4)
    with pytest.raises(UserError):
        create_verifier(name, crown_batch=-2)


def test_bound_verifier_time_limit_gives_unknown():
    trained, x, y = standard_batch(4, 0)
    results = create_verifier("crown", time_limit=1e-9).verify(trained, x, y, 0.01)
    assert all(r.status == "unknown" and r.details["stage"] == "timeout" for r in results)


def test_sound_verifier_keeps_answers_with_budgets():
    """The memory-planned pipeline answers exactly like a generous budget on a tiny network."""
    trained = tiny_model(0, "point", 0.2, kind="conv")
    x, y = labelled_batch(trained, 0.1, 0, n=6)
    big = [r.status for r in create_verifier("abscert-sound", memory_mb=1e6).verify(trained, x, y, 0.1)]
    small = [r.status for r in create_verifier("abscert-sound", memory_mb=64).verify(trained, x, y, 0.1)]
    assert big == small and np.isin(big, ["verified", "falsified", "unknown"]).all()


def test_pre_pass_is_kept_only_while_it_pays():
    from abscert_bench.sound.bounds import HullBounder

    bounder = HullBounder(tiny_model(0, "point", 0.2, kind="fc"))
    assert bounder.quick_useful()  # nothing measured
    bounder.quick_tried, bounder.quick_decided = 15, 0
    assert bounder.quick_useful()  # not judged before 16 samples
    bounder.quick_tried = 16
    assert not bounder.quick_useful()  # decides none of 16: dropped
    bounder.quick_tried, bounder.quick_decided = 100, 5
    assert bounder.quick_useful()  # decides 5 %
    bounder.quick_off = True
    assert not bounder.quick_useful()


def test_a_stopped_pass_leaves_no_matrices_behind(monkeypatch):
    """A backward pass refused half-way drops the A matrices it had reached (they would inflate the next call's
    starting memory by GBs on DM_Large)."""
    bounded, inputs = small_bounded()
    ran = []
    for node in bounded._modules.values():
        if type(node).__name__ == "BoundLinear":
            inner = node.bound_backward
            object.__setattr__(node, "bound_backward", lambda *a, _inner=inner, **k: ran.append(1) or _inner(*a, **k))
    limits = guarded(bounded)
    monkeypatch.setattr(budget, "backward_step_mb",
                        lambda node, la, ua: 10.0 if type(node).__name__ == "BoundRelu" else 0.0)
    with pytest.raises(OutOfMemoryBudget):
        with limited(limits, budget_mb=5.0):
            bounded.compute_bounds(x=inputs, method="CROWN")
    assert ran  # the pass had started: a Linear step ran and handed its A to the ReLU before the refusal
    assert all(getattr(node, "lA", None) is None and getattr(node, "uA", None) is None
               for node in bounded._modules.values())


def test_a_budget_answer_keeps_no_frames_alive():
    """within_budget returns the limit's exception without tracebacks, so the stopped bound's locals (its A
    matrices) are freed before the caller tries a cheaper bound."""
    import gc
    import weakref

    refs = []

    def stopped_bound():
        matrices = torch.ones(1000)
        refs.append(weakref.ref(matrices))
        try:
            raise MemoryError("inner")
        except MemoryError:
            raise OutOfMemoryBudget("past the budget")  # noqa: B904 - a chained context, as auto_LiRPA's may be

    answer = budget.within_budget(stopped_bound)
    gc.collect()
    assert isinstance(answer, OutOfMemoryBudget) and answer.__traceback__ is None
    assert answer.__context__ is not None and answer.__context__.__traceback__ is None
    assert refs[0]() is None
    with pytest.raises(ValueError):  # any other error still propagates
        budget.within_budget(lambda: int("x"))
