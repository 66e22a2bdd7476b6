"""Registries: names → builders, with the metadata (title, order, cost) each entry declares where it registers."""
import dataclasses

import pytest

from abscert_bench.errors import UserError
from abscert_bench.registry import DEFAULT_ORDER, Registry
from abscert_bench.verification.base import DEFAULT_VERIFY_COST, VerifierMeta, all_verifier_names, verifier_meta


def test_register_keeps_metadata_and_defaults():
    reg: Registry = Registry("thing", VerifierMeta)
    reg.register("b", title="Bee", order=5, cost=2.0, group="bound")(object)
    reg.add("a", int)
    assert reg.get("a") is int and reg.names() == ["a", "b"]
    bee, plain = reg.meta("b"), reg.meta("a")
    assert (bee.title, bee.long_title, bee.order, bee.cost, bee.group) == ("Bee", "Bee", 5, 2.0, "bound")
    assert (plain.title, plain.long_title, plain.order, plain.cost, plain.group) == \
        ("a", "a", DEFAULT_ORDER, DEFAULT_VERIFY_COST, "other")
    assert reg.ordered(["a", "b", "zz"]) == ["b", "a", "zz"]  # unregistered names sort like entries without order
    with pytest.raises(dataclasses.FrozenInstanceError):
        bee.title = "x"  # type: ignore[misc]


def test_registry_errors():
    reg: Registry = Registry("thing")
    reg.add("a", int)
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("a", float)
    with pytest.raises(UserError, match="unknown thing 'c'; valid: a"):
        reg.meta("c")
    with pytest.raises(TypeError):
        reg.add("d", int, cost=1.0)  # the plain Meta has no cost
    with pytest.raises(ValueError, match="group"):
        Registry("v", VerifierMeta).add("x", int, group="exotic")


def test_builtin_verifiers_declare_their_titles():
    names = all_verifier_names()
    assert [n for n in sorted(names, key=lambda n: verifier_meta(n).order)][:6] == \
        ["abscert-paper", "abscert-sound", "ibp", "crown", "alpha-crown", "pgd"]
    assert verifier_meta("alpha-crown").latex_title == r"$\alpha$-CROWN"
    assert verifier_meta("ibp").long_title == "IBP bound" and verifier_meta("abscert-sound").group == "abscert"
    assert verifier_meta("cascade:pgd+ibp").title == "cascade:pgd+ibp"  # not registered: defaults
