"""Cascade: run cheap verifiers first; pass only the undecided samples to the next one."""
from __future__ import annotations

import torch

from ..trained import TrainedModel
from .base import SampleResult, Verifier


def run_cascade(
    verifiers: list[Verifier], trained: TrainedModel, x: torch.Tensor, y: torch.Tensor, eps: float,
    batch_size: int = 64, progress=None,
) -> list[SampleResult]:
    """Final per-sample results; time is the sum over the stages a sample went through."""
    results: dict[int, SampleResult] = {}
    pending = list(range(len(x)))
    for verifier in verifiers:
        if not pending:
            break
        answers = verifier.verify(trained, x[pending], y[pending], eps, indices=pending,
                                  batch_size=batch_size, progress=progress)
        for answer in answers:
            previous = results.get(answer.index)
            if previous is not None:
                answer.time_s += previous.time_s
            results[answer.index] = answer
        pending = [r.index for r in answers if r.status == "unknown"]
    return [results[i] for i in range(len(x))]
