"""`ibp`, `crown`, `alpha-crown`: auto_LiRPA bounds on the margins over the [0,1]-clipped L∞ ball."""
from __future__ import annotations

import torch

from abscert_bench.abstraction import ball
from abscert_bench.verify.base import VERIFIERS, Verifier, clean_check
from abscert_bench.verify.pgd import pgd_attack

from .bounds import bounded_module, margin_lower_bounds, set_batchnorm_training


class BoundVerifier(Verifier):
    """Sound but incomplete: `verified` when every margin lower bound is positive."""

    bound_opts: dict | None = None  # auto_LiRPA BoundedModule options

    def __init__(self, name: str) -> None:
        self.name = name
        self.meaning = f"auto_LiRPA {name} bounds on the L∞ ball clipped to [0,1] (sound, incomplete)"
        self._bounded: dict[int, object] = {}

    def applies_to(self, trained) -> bool:
        return trained.abstraction is None

    def bounded_for(self, trained, example: torch.Tensor):
        """One BoundedModule per network, built on first use, bounding the network in eval mode: BatchNorm uses
        its running statistics, i.e. the deployed network (converted with `network.eval()`, see bounds._build)."""
        key = id(trained.network)
        if key not in self._bounded:
            trained.network.eval()
            self._bounded[key] = bounded_module(trained.network, example, self.bound_opts)
        set_batchnorm_training(self._bounded[key], False)
        return self._bounded[key]

    def release(self) -> None:
        """Drop the BoundedModules: they hold every intermediate bound of the last batch (GBs for CROWN on a
        large network), which must not outlive the `verify` call."""
        self._bounded.clear()

    def margins(self, bounded, lower, upper, y, num_classes) -> torch.Tensor:
        """Margin lower bounds for a batch of correctly classified samples."""
        return margin_lower_bounds(bounded, lower, upper, y, num_classes, self.name).detach()

    def prefilter(self, trained, x, y, eps, answers: list, keep: torch.Tensor) -> torch.Tensor:
        """Hook: settle some samples before bounding (by default none); return those still open."""
        return keep

    def verify_batch(self, trained, x, y, eps):
        trained.network.eval()
        correct = clean_check(trained.network, x, y)
        answers: list = [("falsified", x[i].cpu().numpy(), {"reason": "clean misclassified"}) for i in range(len(x))]
        keep = self.prefilter(trained, x, y, eps, answers, correct.nonzero().flatten())
        if len(keep):
            lower, upper = ball(x[keep], eps)
            margins = self.margins(self.bounded_for(trained, x), lower, upper, y[keep], trained.num_classes)
            for row, i in enumerate(keep.tolist()):
                worst = float(margins[row].min())
                answers[i] = ("verified" if worst > 0 else "unknown", None, {"min_margin_lb": worst})
        return answers


ALPHA_BATCH = 4  # samples per alpha-CROWN optimisation (64 needed ~31 GB on MNIST DM_Small)


class AlphaCrownVerifier(BoundVerifier):
    """alpha-CROWN, optimised only where plain CROWN (its starting point) did not already verify.

    Samples PGD falsifies first (with a counterexample re-checked by running the model) are reported
    falsified without the expensive optimisation: no sound method could verify them, so the verified
    count is unchanged and only time is saved.
    """

    # auto_LiRPA 0.3's sparse per-feature alpha fails with a shape mismatch on conv nets (DM_Small, MNIST).
    bound_opts = {"sparse_features_alpha": False}

    def prefilter(self, trained, x, y, eps, answers: list, keep: torch.Tensor) -> torch.Tensor:
        if not len(keep):
            return keep
        adversarial, found = pgd_attack(trained.network, x[keep], y[keep], eps)
        for row, i in enumerate(keep.tolist()):
            if found[row]:
                answers[i] = ("falsified", adversarial[row].detach().cpu().numpy(), {"reason": "pgd"})
        return keep[~found]

    def release(self) -> None:
        """Drop the BoundedModules: they hold every intermediate bound of the last batch (GBs for CROWN on a
        large network), which must not outlive the `verify` call."""
        self._bounded.clear()

    def margins(self, bounded, lower, upper, y, num_classes) -> torch.Tensor:
        crown = margin_lower_bounds(bounded, lower, upper, y, num_classes, "crown").detach()
        open_rows = (crown.min(dim=1).values <= 0).nonzero().flatten()
        for chunk in open_rows.split(ALPHA_BATCH) if len(open_rows) else ():  # alpha's memory grows with the batch
            optimised = margin_lower_bounds(bounded, lower[chunk], upper[chunk], y[chunk],
                                            num_classes, "alpha-crown").detach()
            crown[chunk] = torch.maximum(crown[chunk], optimised)
        return crown


VERIFIERS.add("ibp", lambda: BoundVerifier("ibp"))
VERIFIERS.add("crown", lambda: BoundVerifier("crown"))
VERIFIERS.add("alpha-crown", lambda: AlphaCrownVerifier("alpha-crown"))
