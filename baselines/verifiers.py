"""`ibp`, `crown`, `alpha-crown`: auto_LiRPA bounds on the margins over the [0,1]-clipped L∞ ball."""
from __future__ import annotations

import torch

from abscert_bench.abstraction import ball
from abscert_bench.verify.base import VERIFIERS, Verifier, clean_check

from .bounds import bounded_module, margin_lower_bounds


class BoundVerifier(Verifier):
    """Sound but incomplete: `verified` when every margin lower bound is positive."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.meaning = f"auto_LiRPA {name} bounds on the L∞ ball clipped to [0,1] (sound, incomplete)"
        self._bounded: dict[int, object] = {}

    def applies_to(self, trained) -> bool:
        return trained.abstraction is None

    def bounded_for(self, trained, example: torch.Tensor):
        """One BoundedModule per network, built on first use."""
        key = id(trained.network)
        if key not in self._bounded:
            self._bounded[key] = bounded_module(trained.network, example)
        return self._bounded[key]

    def verify_batch(self, trained, x, y, eps):
        trained.network.eval()
        correct = clean_check(trained.network, x, y)
        lower, upper = ball(x, eps)
        bounded = self.bounded_for(trained, x)
        margins = margin_lower_bounds(bounded, lower, upper, y, trained.num_classes, self.name).detach()
        answers = []
        for i in range(len(x)):
            if not correct[i]:
                answers.append(("falsified", x[i].cpu().numpy(), {"reason": "clean misclassified"}))
            elif bool((margins[i] > 0).all()):
                answers.append(("verified", None, {"min_margin_lb": float(margins[i].min())}))
            else:
                answers.append(("unknown", None, {"min_margin_lb": float(margins[i].min())}))
        return answers


for _name in ("ibp", "crown", "alpha-crown"):
    VERIFIERS.add(_name, lambda _n=_name: BoundVerifier(_n))
