"""Complete search over the reachable abstract inputs: exact enumeration and branch and bound.

Both work on *domains* (per pixel a contiguous option range [first, last], see `bounds`). Enumeration
evaluates N on every abstract input of a domain in batched forward passes — exact. Branch and bound
splits the pixel whose width accounts for most of the looseness of the worst margin's linear bound
(|coefficient| × width, from the CROWN A-matrix; splitting it removes that term from the bound's gap),
bounds the halves in batches, drops the verified ones, enumerates domains small enough, and tries the
vertex that minimises each linear bound as a counterexample candidate. A domain with every pixel fixed
is a single abstract input and is evaluated directly, so the search is complete given time.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .attack import abstract_batch
from .bounds import DomainBounds, HullBounder
from .choices import PixelOptions

ENUMERATION_CHUNK = 512


@dataclass
class SearchOutcome:
    """What a search decided for one sample: status, the misclassified option choice (if any), effort."""

    status: str                      # 'verified' | 'falsified' | 'unknown'
    choice: np.ndarray | None = None
    branches: int = 0
    stage: str = ""
    notes: dict = field(default_factory=dict)


def domain_size(first: np.ndarray, last: np.ndarray) -> float:
    """Number of abstract inputs in a domain (float, may be huge)."""
    return float(np.prod((last - first + 1).astype(np.float64)))


def misclassified(network: nn.Module, z: torch.Tensor, label: int) -> np.ndarray:
    """Mask of abstract inputs z on which argmax N(z) != label, in chunks."""
    out = []
    with torch.no_grad():
        for start in range(0, len(z), ENUMERATION_CHUNK):
            out.append((network(z[start:start + ENUMERATION_CHUNK]).argmax(1) != label).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def enumerate_domain(
    network: nn.Module, options: PixelOptions, sample: int, label: int, first: np.ndarray, last: np.ndarray,
) -> np.ndarray | None:
    """Exact check of every abstract input of a domain: a misclassified option choice, or None."""
    free = np.flatnonzero(last > first)
    ranges = [range(int(first[i]), int(last[i]) + 1) for i in free]
    combos = itertools.product(*ranges)
    while True:
        block = list(itertools.islice(combos, ENUMERATION_CHUNK))
        if not block:
            return None
        choice = np.repeat(first[None, :], len(block), axis=0)
        if free.size:
            choice[:, free] = np.asarray(block, dtype=np.int64)
        z = abstract_batch(options, np.full(len(block), sample), choice)
        wrong = misclassified(network, z, label)
        if wrong.any():
            return choice[int(np.flatnonzero(wrong)[0])]


def linear_minimiser(options: PixelOptions, sample: int, first: np.ndarray, last: np.ndarray,
                     coeff_lower: np.ndarray, coeff_upper: np.ndarray) -> np.ndarray:
    """Per pixel, the option in range minimising coeff_lower·lower + coeff_upper·upper (a likely worst vertex)."""
    value = coeff_lower[:, None] * options.lower[sample] + coeff_upper[:, None] * options.upper[sample]
    index = np.arange(value.shape[1])[None, :]
    value = np.where((index >= first[:, None]) & (index <= last[:, None]), value, np.inf)
    return value.argmin(axis=1)


def branch_and_bound(
    bounder: HullBounder, network: nn.Module, options: PixelOptions, sample: int, label: int,
    root: DomainBounds | None, deadline: float, batch: int = 16, enumerate_limit: int = 256,
) -> SearchOutcome:
    """Decide one sample by branch and bound over its choice pixels, until verified, falsified or deadline."""
    labels = torch.tensor([label])
    first0 = np.zeros(options.count.shape[1], dtype=np.int64)
    last0 = options.count[sample] - 1
    leaf_limit = max(1, enumerate_limit)
    if root is None:
        root = bounder.bound(options, np.array([sample]), first0[None], last0[None], labels)
    if bool((root.margins[0] > 0).all()):
        return SearchOutcome("verified", stage="bounds")
    # Each queued domain: (worst margin bound, first, last, split score).
    queue: list[tuple[float, np.ndarray, np.ndarray, np.ndarray]] = [
        (float(root.margins[0].min()), first0, last0, root.split_score[0])
    ]
    branches = 0
    while queue:
        if time.perf_counter() > deadline:
            return SearchOutcome("unknown", branches=branches, stage="timeout")
        queue.sort(key=lambda item: item[0])
        picked, queue = queue[:batch], queue[batch:]
        child_first, child_last = [], []
        for _, first, last, score in picked:
            if domain_size(first, last) <= leaf_limit:
                hit = enumerate_domain(network, options, sample, label, first, last)
                if hit is not None:
                    return SearchOutcome("falsified", hit, branches, "bab")
                continue
            free = last > first
            pixel = int(np.argmax(np.where(free, score, -np.inf)))
            mid = (first[pixel] + last[pixel]) // 2
            low_last, high_first = last.copy(), first.copy()
            low_last[pixel], high_first[pixel] = mid, mid + 1
            child_first += [first, high_first]
            child_last += [low_last, last]
        if not child_first:
            continue
        firsts, lasts = np.stack(child_first), np.stack(child_last)
        branches += len(firsts)
        bounds = bounder.bound(options, np.full(len(firsts), sample), firsts, lasts, labels.repeat(len(firsts)))
        open_ = ~(bounds.margins > 0).all(dim=1).numpy()
        if not open_.any():
            continue
        idx = np.flatnonzero(open_)
        if bounds.coeff_lower is not None:
            candidates = np.stack([
                linear_minimiser(options, sample, firsts[i], lasts[i], bounds.coeff_lower[i], bounds.coeff_upper[i])
                for i in idx
            ])
            wrong = misclassified(network, abstract_batch(options, np.full(len(idx), sample), candidates), label)
            if wrong.any():
                return SearchOutcome("falsified", candidates[int(np.flatnonzero(wrong)[0])], branches, "bab")
        for i in idx:
            queue.append((float(bounds.margins[i].min()), firsts[i], lasts[i], bounds.split_score[i]))
    return SearchOutcome("verified", branches=branches, stage="bab")
