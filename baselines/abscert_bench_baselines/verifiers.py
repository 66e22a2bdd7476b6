"""`ibp`, `crown`, `alpha-crown`: auto_LiRPA bounds on the margins over the [0,1]-clipped L∞ ball."""
from __future__ import annotations

import time

import torch

from abscert_bench.abstraction import ball
from abscert_bench.budget import DEFAULT_MEMORY_MB, BatchPlanner, BoundTimeout, crown_batch_opts, guarded, within_budget
from abscert_bench.devices import module_device
from abscert_bench.errors import UserError
from abscert_bench.lirpa import bounded_module, margin_lower_bounds, set_batchnorm_training
from abscert_bench.verification.base import VERIFIERS, Verifier, clean_check
from abscert_bench.verification.pgd import pgd_attack


class BoundVerifier(Verifier):
    """Sound but incomplete: `verified` when every margin lower bound is positive.

    Options: `time_limit` (s per sample, None: no limit; not the harness's abscert-sound `timeout`, so
    existing specs bound exactly as before), `memory_mb` (budget of one bound call) and `crown_batch` (0: off;
    N > 0: auto_LiRPA's batched CROWN, intermediate layers' unstable neurons N at a time). Samples are
    bounded in batches planned from the measured memory (`abscert_bench.budget`); a batch past its deadline is
    `unknown` (stage 'timeout'); a sample whose CROWN bound does not fit the budget alone is bounded with IBP
    for the intermediate layers and CROWN for the margins (the cheaper cascade), and is `unknown` (stage
    'memory') if even that does not fit or verify.
    """

    bound_opts: dict | None = None  # auto_LiRPA BoundedModule options

    def __init__(self, name: str, time_limit: float | None = None, memory_mb: float = DEFAULT_MEMORY_MB,
                 crown_batch: int = 0) -> None:
        if time_limit is not None and not float(time_limit) > 0:
            raise UserError(f"{name}: time_limit must be > 0 seconds, got {time_limit}")
        if not float(memory_mb) > 0:
            raise UserError(f"{name}: memory_mb must be > 0, got {memory_mb}")
        self.name = name
        self.time_limit = None if time_limit is None else float(time_limit)
        self.memory_mb = float(memory_mb)
        self.crown_opts = crown_batch_opts(name, crown_batch)
        self.meaning = f"auto_LiRPA {name} bounds on the L∞ ball clipped to [0,1] (sound, incomplete)"
        self._bounded: dict[int, object] = {}
        self._planners: dict[int, BatchPlanner] = {}

    def applies_to(self, trained) -> bool:
        return trained.abstraction is None

    def bounded_for(self, trained, example: torch.Tensor):
        """One BoundedModule per network, built on first use, bounding the network in eval mode: BatchNorm uses
        its running statistics, i.e. the deployed network (converted with `network.eval()`, see bounds._build)."""
        key = id(trained.network)
        if key not in self._bounded:
            trained.network.eval()
            options = {**(self.bound_opts or {}), **self.crown_opts}
            self._bounded[key] = bounded_module(trained.network, example, options or None)
            self._planners[key] = BatchPlanner(self.memory_mb, guarded(self._bounded[key]),
                                               module_device(trained.network))
        set_batchnorm_training(self._bounded[key], False)
        return self._bounded[key]

    def release(self) -> None:
        """Drop the BoundedModules: they hold every intermediate bound of the last batch (GBs for CROWN on a
        large network), which must not outlive the `verify` call."""
        self._bounded.clear()
        self._planners.clear()

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
        if not len(keep):
            return answers
        bounded = self.bounded_for(trained, x)
        planner = self._planners[id(trained.network)]
        lower, upper = ball(x, eps)

        def bound(rows):
            index = torch.as_tensor(list(rows), device=x.device)
            return self.margins(bounded, lower[index], upper[index], y[index], trained.num_classes)

        deadline = None if self.time_limit is None else \
            (lambda rows: time.perf_counter() + self.time_limit * len(rows))
        for rows, margins in planner.chunks(bound, keep.tolist(), len(x), deadline):
            if isinstance(margins, BoundTimeout):
                for i in rows:
                    answers[i] = ("unknown", None, {"stage": "timeout", "note": str(margins)})
                continue
            details = {}
            if isinstance(margins, BaseException):  # one sample's CROWN does not fit: the cheaper cascade
                margins, details = self.cheaper(bounded, planner, lower, upper, y, rows, trained.num_classes), \
                    {"bound": "ibp-intermediate", "note": f"{self.name} alone ran out of memory"}
                if margins is None:
                    answers[rows[0]] = ("unknown", None, {"stage": "memory", **details})
                    continue
            for row, i in enumerate(rows):
                worst = float(margins[row].min())
                answers[i] = ("verified" if worst > 0 else "unknown", None, {"min_margin_lb": worst, **details})
        return answers

    def cheaper(self, bounded, planner, lower, upper, y, rows, num_classes):
        """Margin bounds with IBP for every intermediate layer and CROWN for the margins (None if even that does
        not fit the budget); sound and cheaper than full CROWN, looser."""
        if self.name == "ibp":
            return None
        index = torch.as_tensor(list(rows), device=lower.device)
        margins = within_budget(lambda: planner.call(lambda: margin_lower_bounds(
            bounded, lower[index], upper[index], y[index], num_classes, "crown-ibp").detach(), len(rows)))
        return None if isinstance(margins, BaseException) else margins


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


def _builder(cls, name: str):
    def build(time_limit: float | None = None, memory_mb: float = DEFAULT_MEMORY_MB,
              crown_batch: int = 0) -> BoundVerifier:
        return cls(name, time_limit=time_limit, memory_mb=memory_mb, crown_batch=crown_batch)

    build.__doc__ = (f"{name}: auto_LiRPA bounds on the clipped L∞ ball (time_limit s per sample, memory_mb per "
                     "bound call, crown_batch unstable neurons per batched-CROWN pass, 0: off).")
    return build


VERIFIERS.add("ibp", _builder(BoundVerifier, "ibp"), title="IBP", long_title="IBP bound", order=30, cost=6.0,
              group="bound")
VERIFIERS.add("crown", _builder(BoundVerifier, "crown"), title="CROWN", long_title="CROWN bound", order=40,
              cost=300.0, group="bound")
VERIFIERS.add("alpha-crown", _builder(AlphaCrownVerifier, "alpha-crown"), title="α-CROWN",
              long_title="α-CROWN bound", latex_title=r"$\alpha$-CROWN", order=50, cost=5000.0, group="bound")
