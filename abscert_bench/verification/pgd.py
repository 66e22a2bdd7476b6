"""`pgd`: projected gradient descent on the margin loss. An attack: it can only falsify."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..abstraction import ball
from .base import VERIFIERS, Verifier


def pgd_attack(classifier, x, y, eps, steps: int = 20, restarts: int = 1, step_size: float | None = None):
    """Return (adversarial images, mask of successful attacks) within the [0,1]-clipped eps ball."""
    lower, upper = ball(x, eps)
    step_size = step_size if step_size is not None else 2.5 * eps / max(steps, 1)
    best = x.clone()
    found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for restart in range(restarts):
        start = x if restart == 0 else lower + (upper - lower) * torch.rand_like(x)
        adv = start.clone().detach()
        for _ in range(steps):
            adv.requires_grad_(True)
            logits = classifier(adv)
            loss = F.cross_entropy(logits, y)
            (grad,) = torch.autograd.grad(loss, adv)
            adv = torch.max(torch.min(adv.detach() + step_size * grad.sign(), upper), lower)
        with torch.no_grad():
            wrong = classifier(adv).argmax(1) != y
        new = wrong & ~found
        best[new] = adv[new]
        found |= wrong
    return best, found


class PGDAttack(Verifier):
    """Falsifies samples whose PGD adversarial example is misclassified (re-checked); never verifies."""

    name = "pgd"
    meaning = "PGD attack: falsified or unknown, never verified (an upper bound on robust accuracy)"
    attack_only = True

    def __init__(self, steps: int = 20, restarts: int = 1) -> None:
        self.steps, self.restarts = steps, restarts

    def applies_to(self, trained) -> bool:
        return trained.abstraction is None

    def verify_batch(self, trained, x, y, eps):
        classifier = trained.classifier()
        adv, found = pgd_attack(classifier, x, y, eps, self.steps, self.restarts)
        return [
            ("falsified", adv[i].detach().cpu().numpy(), {}) if hit else ("unknown", None, {})
            for i, hit in enumerate(found.tolist())
        ]


@VERIFIERS.register("pgd", title="PGD", long_title="PGD (attack, upper bound)", order=60, cost=50.0, group="attack")
def pgd(steps: int = 20, restarts: int = 1) -> Verifier:
    """PGD attack verifier."""
    return PGDAttack(steps, restarts)
