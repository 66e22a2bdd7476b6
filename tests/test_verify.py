"""Verifier protocol: per-sample answers, soundness laws, cascade, results on disk."""
import json

import numpy as np
import pytest
import torch

from abscert_bench.errors import UserError
from abscert_bench.trained import load_checkpoint
from abscert_bench.verification import create_verifier, run_cascade
from abscert_bench.verification.run import applicable_verifiers, verify_run

EPS = 0.1


@pytest.fixture(scope="module")
def batch(digits):
    return digits.test_x[:40], digits.test_y[:40]


def test_paper_check_is_one_forward_pass(runs, batch):
    trained = load_checkpoint(runs["abscert"])
    x, y = batch
    results = create_verifier("abscert-paper").verify(trained, x, y, EPS)
    predicted = trained.classifier()(x).argmax(1)
    assert [r.status == "verified" for r in results] == (predicted == y).tolist()


def test_paper_check_refuses_d_below_2eps(runs, batch):
    trained = load_checkpoint(runs["abscert"])
    with pytest.raises(UserError, match="d >= 2\\*eps"):
        create_verifier("abscert-paper").verify(trained, *batch, eps=0.15)


@pytest.mark.parametrize("name", ["ibp", "crown", "alpha-crown"])
def test_bound_verifiers_are_sound(runs, batch, name):
    trained = load_checkpoint(runs["ibp"])
    x, y = batch
    results = create_verifier(name).verify(trained, x, y, 0.02)
    verified = [r.index for r in results if r.status == "verified"]
    assert verified, "the IBP-trained model should verify some samples at eps=0.02"
    net = trained.classifier()
    with torch.no_grad():
        for i in verified:
            lo, hi = (x[i] - 0.02).clamp(0, 1), (x[i] + 0.02).clamp(0, 1)
            samples = lo + (hi - lo) * torch.rand(256, *x[i].shape)
            corners = torch.where(torch.rand(256, *x[i].shape) < 0.5, lo, hi)
            for pts in (samples, corners):
                assert (net(pts).argmax(1) == y[i]).all()
    for r in results:
        if r.status == "falsified":
            assert net(torch.from_numpy(r.counterexample)[None]).argmax(1) != y[r.index]


def test_alpha_crown_verifies_at_least_what_crown_does(runs, batch):
    trained = load_checkpoint(runs["crown-ibp"])
    crown = create_verifier("crown").verify(trained, *batch, eps=0.03)
    alpha = create_verifier("alpha-crown").verify(trained, *batch, eps=0.03)
    assert {r.index for r in crown if r.status == "verified"} <= {r.index for r in alpha if r.status == "verified"}


def test_pgd_only_falsifies_with_real_counterexamples(runs, batch):
    trained = load_checkpoint(runs["natural"])
    x, y = batch
    results = create_verifier("pgd").verify(trained, x, y, EPS)
    assert all(r.status in ("falsified", "unknown") for r in results)
    falsified = [r for r in results if r.status == "falsified"]
    assert falsified
    for r in falsified:
        adv = torch.from_numpy(r.counterexample)
        assert float((adv - x[r.index]).abs().max()) <= EPS + 1e-6
        assert 0 <= float(adv.min()) and float(adv.max()) <= 1
        assert int(trained.classifier()(adv[None]).argmax(1)) != int(y[r.index])


def test_never_verified_and_falsified(runs, batch):
    trained = load_checkpoint(runs["crown-ibp"])
    x, y = batch
    verified = {r.index for r in create_verifier("crown").verify(trained, x, y, 0.03) if r.status == "verified"}
    falsified = {r.index for r in create_verifier("pgd").verify(trained, x, y, 0.03) if r.status == "falsified"}
    assert not verified & falsified


def test_cascade_passes_on_only_undecided(runs, batch):
    trained = load_checkpoint(runs["crown-ibp"])
    x, y = batch
    calls, undecided = [], []

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def verify(self, trained, x, y, eps, indices=None, batch_size=64, progress=None):
            calls.append(list(indices))
            answers = self.inner.verify(trained, x, y, eps, indices=indices, batch_size=batch_size)
            undecided.append([r.index for r in answers if r.status == "unknown"])
            return answers

    stages = [Spy(create_verifier("ibp")), Spy(create_verifier("pgd")), Spy(create_verifier("crown"))]
    results = run_cascade(stages, trained, x, y, 0.03)
    assert calls[0] == list(range(len(x)))
    for stage in range(1, len(calls)):
        assert calls[stage] == undecided[stage - 1]
    assert len(calls) == 3 or not undecided[len(calls) - 1]
    assert [r.index for r in results] == list(range(len(x)))
    final_unknown = {r.index for r in results if r.status == "unknown"}
    assert final_unknown == set(undecided[-1])
    assert all(r.decided_by in ("ibp", "pgd", "crown") for r in results if r.status != "unknown")


def test_verifiers_refuse_models_they_do_not_apply_to(runs, batch):
    with pytest.raises(UserError, match="does not apply"):
        create_verifier("crown").verify(load_checkpoint(runs["abscert"]), *batch, eps=EPS)
    with pytest.raises(UserError, match="does not apply"):
        create_verifier("abscert-paper").verify(load_checkpoint(runs["natural"]), *batch, eps=EPS)


def test_nan_images_are_refused(runs, batch):
    x, y = batch
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        create_verifier("ibp").verify(load_checkpoint(runs["natural"]), x, y, EPS)


def test_unknown_verifier_lists_valid_names():
    with pytest.raises(UserError, match="alpha-crown"):
        create_verifier("marabou")


def test_verify_run_writes_results_and_refuses_overwrite(runs):
    run_dir = runs["natural"]
    summaries = verify_run(run_dir, verifiers=["ibp", "pgd"], limit=20)
    out = run_dir / "verify" / "eps=0.1,first=20"
    for name in ("ibp", "pgd"):
        summary = json.loads((out / f"{name}.json").read_text())
        assert summary["samples"] == 20
        assert summary["verified"] + summary["falsified"] + summary["unknown"] == 20
    assert (out / "pgd.counterexamples.npz").exists()
    cex = np.load(out / "pgd.counterexamples.npz")
    assert len(cex["index"]) == summaries[1]["falsified"]
    assert np.abs(cex["x_adv"] - cex["x"]).max() <= 0.1 + 1e-6
    with pytest.raises(UserError, match="--force"):
        verify_run(run_dir, verifiers=["ibp"], limit=20)
    verify_run(run_dir, verifiers=["ibp"], limit=20, force=True)
    assert json.loads((out / "ibp.json").read_text())["samples"] == 20
    verify_run(run_dir, verifiers=["ibp"], limit=10)
    assert json.loads((run_dir / "verify" / "eps=0.1,first=10" / "ibp.json").read_text())["samples"] == 10


def test_verify_run_can_skip_inapplicable_verifiers(runs):
    summaries = verify_run(runs["abscert"], verifiers=["ibp", "abscert-paper"], limit=5, skip_inapplicable=True)
    assert [s["verifier"] for s in summaries] == ["abscert-paper"]
    assert verify_run(runs["natural"], verifiers=["abscert-paper"], limit=5, skip_inapplicable=True) == []


def test_default_verifiers_follow_the_model(runs):
    assert "abscert-paper" in applicable_verifiers(load_checkpoint(runs["abscert"]))
    standard = applicable_verifiers(load_checkpoint(runs["natural"]))
    assert {"ibp", "crown", "alpha-crown", "pgd"} <= set(standard) and "abscert-paper" not in standard


@pytest.mark.parametrize("name", ["ibp", "crown", "alpha-crown"])
def test_bound_verifiers_release_their_bounded_module(runs, batch, name, monkeypatch):
    """The BoundedModule (all intermediate bounds) lives only for one `verify` call, also when the call fails."""
    trained = load_checkpoint(runs["ibp"])
    x, y = batch
    verifier = create_verifier(name)
    seen = []
    original = verifier.bounded_for
    monkeypatch.setattr(verifier, "bounded_for", lambda *a: seen.append(original(*a)) or seen[-1])
    verifier.verify(trained, x[:4], y[:4], 0.05, batch_size=2)
    assert seen and not verifier._bounded  # built for the batches, gone afterwards

    def failing(*args):
        original(*args)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(verifier, "bounded_for", failing)
    with pytest.raises(RuntimeError):
        verifier.verify(trained, x[:4], y[:4], 0.05)
    assert not verifier._bounded
