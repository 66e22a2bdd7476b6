"""Verifier protocol: model, images, labels, eps → per-sample verified / falsified / unknown, with time."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..registry import Meta, Registry
from ..trained import TrainedModel

STATUSES = ("verified", "falsified", "unknown")


@dataclass
class SampleResult:
    """One sample's answer. `counterexample` (raw image in the ball) is set exactly when falsified."""

    index: int
    label: int
    status: str
    time_s: float
    decided_by: str = ""
    counterexample: np.ndarray | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"bad status {self.status!r}")


class Verifier:
    """Base verifier. `meaning` names the question it answers (docs/architecture.md: never conflate them)."""

    name = "verifier"
    meaning = ""
    sound = True  # a `verified` answer comes from a sound procedure (the paper check is not)
    attack_only = False  # can only falsify (its accuracy is an upper bound on robust accuracy)

    def applies_to(self, trained: TrainedModel) -> bool:
        """Whether this verifier can check this kind of model."""
        return True

    def verify_batch(
        self, trained: TrainedModel, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> list[tuple[str, np.ndarray | None, dict[str, Any]]]:
        """(status, counterexample, details) per sample of one batch."""
        raise NotImplementedError

    def verify(
        self, trained: TrainedModel, x: torch.Tensor, y: torch.Tensor, eps: float,
        indices: list[int] | None = None, batch_size: int = 64, progress: Callable[[int], None] | None = None,
    ) -> list[SampleResult]:
        """Verify every sample; time per sample is the batch's wall time shared equally."""
        if not self.applies_to(trained):
            raise UserError(f"verifier {self.name} does not apply to this model ({self.meaning})")
        if not torch.isfinite(x).all():
            raise UserError("images contain NaN or inf")
        indices = list(range(len(x))) if indices is None else list(indices)
        results: list[SampleResult] = []
        try:
            for start, stop in batches(len(x), batch_size):
                answers = self.timed_batch(trained, x[start:stop], y[start:stop], eps)
                for offset, (status, cex, details, seconds) in enumerate(answers):
                    results.append(SampleResult(
                        indices[start + offset], int(y[start + offset]), status, seconds,
                        self.name if status != "unknown" else "", cex, details,
                    ))
                if progress is not None:
                    progress(stop - start)
        finally:
            self.release()  # also when a cap or an error ends the run: the next verifier gets the memory
        return results

    def release(self) -> None:
        """Drop whatever was cached for the batches of one `verify` call (bound verifiers: their BoundedModule)."""

    def timed_batch(
        self, trained: TrainedModel, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> list[tuple[str, np.ndarray | None, dict[str, Any], float]]:
        """`verify_batch` answers plus seconds per sample (the batch's wall time shared equally)."""
        start = time.perf_counter()
        answers = self.verify_batch(trained, x, y, eps)
        share = (time.perf_counter() - start) / max(1, len(x))
        return [(status, cex, details, share) for status, cex, details in answers]


def batches(n: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) pairs covering range(n) in chunks of `size`."""
    for start in range(0, n, size):
        yield start, min(n, start + size)


DEFAULT_VERIFY_COST = 100.0
VERIFIER_GROUPS = ("abscert", "bound", "attack", "other")


@dataclass(frozen=True)
class VerifierMeta(Meta):
    """A verifier's place in the tables and the scheduler, declared where it is registered:
    `@VERIFIERS.register(name, title=…, long_title=…, order=…, cost=…, group=…)`.

    * `title`: short column title (harness tables; default: the name); `latex_title`: the same in LaTeX
      (default: `title`, escaped by the table); `long_title`: the title with its meaning (the `table` /
      `compare` columns; default: `title`);
    * `order`: column order (lower first; default after the built-ins);
    * `cost`: work per verified sample, in natural-training image-epochs (the scheduler's estimate);
    * `group`: `abscert` (an AbsCert meaning, compared with the best baseline), `bound` (a sound bound of
      standard models: a baseline counts its tightest), `attack` (can only falsify; not a column of the
      comparison table) or `other`.
    """

    long_title: str = ""
    latex_title: str = ""
    cost: float = DEFAULT_VERIFY_COST
    group: str = "other"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.long_title:
            object.__setattr__(self, "long_title", self.title)
        if self.group not in VERIFIER_GROUPS:
            raise ValueError(f"verifier {self.name!r}: group must be one of {', '.join(VERIFIER_GROUPS)}")


VERIFIERS: Registry[Callable[..., Verifier]] = Registry("verifier", VerifierMeta)


def create_verifier(name: str, **options: Any) -> Verifier:
    """Build a verifier by registry name (built-ins, baselines and plugins: the registry is complete on import)."""
    return VERIFIERS.get(name)(**options)


def verifier_takes(name: str, option: str) -> bool:
    """Whether verifier `name`'s builder has the keyword `option` (e.g. 'timeout')."""
    import inspect

    return option in inspect.signature(VERIFIERS.get(name)).parameters


def all_verifier_names() -> list[str]:
    """Every registered verifier name."""
    return VERIFIERS.names()


def verifier_meta(name: str) -> VerifierMeta:
    """The registered metadata of verifier `name`; defaults for a name outside the registry (a cascade)."""
    return VERIFIERS.meta(name) if name in VERIFIERS else VERIFIERS.default_meta(name)


def verifiers_in_group(*groups: str) -> list[str]:
    """Registered verifiers of the given groups, in their order."""
    return [n for n in VERIFIERS.ordered(VERIFIERS.names()) if verifier_meta(n).group in groups]


def summarize(results: list[SampleResult]) -> dict[str, Any]:
    """Counts, fractions and time statistics of a result list."""
    n = len(results)
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    times = np.array([r.time_s for r in results]) if results else np.zeros(1)
    return {
        "samples": n,
        **counts,
        **{f"{s}_fraction": (counts[s] / n if n else 0.0) for s in STATUSES},
        "time_total_s": float(times.sum()),
        "time_mean_s": float(times.mean()),
        "time_median_s": float(np.median(times)),
        "time_p95_s": float(np.percentile(times, 95)),
    }


def clean_check(classifier: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Boolean mask of samples the classifier gets right on the clean image."""
    with torch.no_grad():
        return classifier(x).argmax(1) == y
