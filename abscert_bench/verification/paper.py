"""`abscert-paper`: the published AbsCert check — N(phi(x)) == y, accepted only when d >= 2·eps.

This is NOT a sound robustness certificate for the deployed classifier (pixels near cell edges can move
to the neighbouring cell); `abscert-sound` answers that question.
"""
from __future__ import annotations

from ..errors import UserError
from .base import VERIFIERS, Verifier, clean_check


class PaperCheck(Verifier):
    """One forward pass of the deployed classifier; `verified` means the paper's criterion holds."""

    name = "abscert-paper"
    meaning = "AbsCert paper check: N(phi(x)) == y with d >= 2·eps (not a sound L∞ certificate)"
    sound = False

    def applies_to(self, trained) -> bool:
        return trained.abstraction is not None

    def verify_batch(self, trained, x, y, eps):
        d = trained.abstraction.d
        if d < 2 * eps - 1e-12:
            raise UserError(f"abscert-paper needs d >= 2*eps, got d = {d}, eps = {eps}")
        correct = clean_check(trained.classifier(), x, y)
        return [
            ("verified", None, {}) if ok else ("falsified", x[i].cpu().numpy(), {"reason": "clean misclassified"})
            for i, ok in enumerate(correct.tolist())
        ]


@VERIFIERS.register("abscert-paper", title="AbsCert paper", long_title="AbsCert paper check (not sound)", order=10,
                    cost=1.0, group="abscert")
def paper_check() -> Verifier:
    """The published AbsCert check."""
    return PaperCheck()
