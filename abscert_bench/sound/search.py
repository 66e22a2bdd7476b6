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
from typing import Any

import numpy as np
import torch
from torch import nn

from ..budget import budget_stage, within_budget
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


@dataclass
class Domain:
    """An open BaB domain with its bounds: worst margin bound, split scores, linear bound, ReLU-input bounds."""

    margin: float
    first: np.ndarray
    last: np.ndarray
    score: np.ndarray
    coeff_lower: np.ndarray | None
    coeff_upper: np.ndarray | None
    intermediate: dict | None
    age: int  # splits since its ReLU-input bounds were last computed fully


def _stack(parents: list[Domain], names: list[str]) -> dict | None:
    """Batch the parents' bounds on the ReLU inputs `names` (None if any parent lacks them)."""
    bounds = [p.intermediate for p in parents if p.intermediate is not None]
    if not names or len(bounds) < len(parents):
        return None
    return {name: (torch.cat([b[name][0] for b in bounds]),
                   torch.cat([b[name][1] for b in bounds])) for name in names}


def _fitting(candidates: list[Domain], rates: dict[bool, float], left: float, refresh_every: int) -> list[bool]:
    """How to bound the children of the first of `candidates` (sorted, most promising first) within `left` seconds:
    per picked parent, True for a refresh of its two children, False for cheap bounds with its ReLU-input bounds.

    A kind of call not measured yet (no entry in `rates`: seconds per domain) is taken to fit; a parent due for a
    refresh is bounded cheaply when only that fits (it stays due); picking stops at the first parent whose
    children fit neither way (an empty list: none fits)."""
    plans: list[bool] = []
    spent = 0.0
    for parent in candidates:
        if parent.intermediate is None:  # no ReLU-input bounds of its own to reuse: a refresh or nothing
            kinds: tuple[bool, ...] = (True,)
        else:
            kinds = (True, False) if parent.age + 1 >= refresh_every else (False,)
        for is_refresh in kinds:
            cost = 2 * rates.get(is_refresh, 0.0)
            if spent + cost <= left:
                plans.append(is_refresh)
                spent += cost
                break
        else:
            break
    return plans


def branch_and_bound(
    bounder: HullBounder, network: nn.Module, options: PixelOptions, sample: int, label: int,
    root: DomainBounds | None, deadline: float, batch: int = 32, enumerate_limit: int = 256,
    refresh_every: int = 2, alpha_iterations: int = 0,
) -> SearchOutcome:
    """Decide one sample by branch and bound over its choice pixels, until verified, falsified or deadline.

    Every bound call runs under the deadline and the bounder's memory budget (domains per call: at most
    `batch`, fewer when the budget says so); running out of either ends the search as `unknown`.

    Children reuse their parent's bounds on every ReLU input but the first (sound: a child's hull lies in
    its parent's), so a child costs one backward pass for the margins instead of a full CROWN run; every
    `refresh_every` splits a domain's ReLU-input bounds are recomputed, tightened by the parent's — and at once for
    the root's children where refreshes are by windows (`HullBounder.windows_refresh`: deep chains whose root bounds
    came from the forward pass). A cheap bound recomputes only the first ReLU layer, which there leaves a root child's
    margins near the root's; on AbsCert DM_Large, where a refresh takes 1–2 s a domain and the search rarely reaches
    a second level in time, refreshing the root's children decided 2 of the 4 samples left unknown among the first 20
    pixel test images (at 7.1 and 9.9 s), against 1 (at 9.95 s) without (scratch probe, 2026-12-07; the pixel
    DM_Medium's 7 branching samples among its first 50 kept their verdicts).

    The time left also sizes the calls (`_fitting`): once a kind of call (cheap, refresh) has run, its seconds per
    domain plan the next one, so a call is expected to end by the deadline — a child due for a refresh that does
    not fit is bounded cheaply instead, and when not even that fits the search ends `unknown` at once rather than
    after a call that runs past the deadline (a stopped call's step still ends late: checks sit between steps).

    `alpha_iterations` > 0 raises the margins of every domain a call leaves open by that many steps of α-CROWN over
    their ReLU-input bounds (`HullBounder.optimized`), counted in the call's measured time.
    """
    # domains bounded so far and the lowest margin bound over the open domains, also when a call is stopped
    progress: dict[str, Any] = {"branches": 0, "margin_lb": -np.inf}
    outcome = within_budget(lambda: _branch_and_bound(bounder, network, options, sample, label, root, deadline,
                                                      batch, enumerate_limit, refresh_every, alpha_iterations,
                                                      progress))
    if isinstance(outcome, BaseException):
        outcome = SearchOutcome("unknown", branches=progress["branches"], stage=budget_stage(outcome),
                                notes={"stopped": str(outcome)})
    if outcome.status == "unknown" and np.isfinite(progress["margin_lb"]):
        outcome.notes["margin_lb"] = float(progress["margin_lb"])
    return outcome


def _branch_and_bound(bounder, network, options, sample, label, root, deadline, batch, enumerate_limit,
                      refresh_every, alpha_iterations, progress: dict) -> SearchOutcome:
    labels = torch.tensor([label])
    first0 = np.zeros(options.count.shape[1], dtype=np.int64)
    last0 = options.count[sample] - 1
    leaf_limit = max(1, enumerate_limit)
    if root is None:
        root = bounder.bound(options, np.array([sample]), first0[None], last0[None], labels, deadline=deadline)
    if bool((root.margins[0] > 0).all()):
        return SearchOutcome("verified", stage="bounds")
    queue = [Domain(float(root.margins[0].min()), first0, last0, root.split_score[0],
                    None if root.coeff_lower is None else root.coeff_lower[0],
                    None if root.coeff_upper is None else root.coeff_upper[0], root.intermediate_of(0),
                    refresh_every - 1 if bounder.windows_refresh() else 0)]  # (age: its children's refresh due)
    reused = bounder.relu_inputs[1:]
    branches = 0
    rates: dict[bool, float] = {}  # seconds per domain of the last cheap (False) and refresh (True) bound call
    while queue:
        if time.perf_counter() > deadline:
            return SearchOutcome("unknown", branches=branches, stage="timeout")
        queue.sort(key=lambda item: item.margin)
        # every reachable abstract input lies in an open domain or in one shown correct: the lowest margin bound of
        # the open domains is a lower bound on the sample's worst margin (each such bound holds, so the highest too;
        # the first is the root's)
        progress["margin_lb"] = max(progress["margin_lb"], queue[0].margin)
        take = max(1, bounder.planner.size(batch) // 2)  # two children per picked domain
        plans = _fitting(queue[:take], rates, deadline - time.perf_counter(), refresh_every)
        if not plans:  # not even one domain's cheap bound fits the time left
            return SearchOutcome("unknown", branches=branches, stage="timeout",
                                 notes={"stopped": "the next bound call would pass the deadline"})
        picked, queue = queue[:len(plans)], queue[len(plans):]
        children: list[tuple[Domain, np.ndarray, np.ndarray, bool]] = []
        for parent, is_refresh in zip(picked, plans):
            if domain_size(parent.first, parent.last) <= leaf_limit:
                hit = enumerate_domain(network, options, sample, label, parent.first, parent.last)
                if hit is not None:
                    return SearchOutcome("falsified", hit, branches, "bab")
                continue
            free = parent.last > parent.first
            pixel = int(np.argmax(np.where(free, parent.score, -np.inf)))
            mid = (parent.first[pixel] + parent.last[pixel]) // 2
            low_last, high_first = parent.last.copy(), parent.first.copy()
            low_last[pixel], high_first[pixel] = mid, mid + 1
            children += [(parent, parent.first, low_last, is_refresh), (parent, high_first, parent.last, is_refresh)]
        if not children:
            continue
        branches += len(children)
        progress["branches"] = branches
        for is_refresh in (False, True):
            group = [c for c in children if c[3] == is_refresh]
            if not group:
                continue
            if time.perf_counter() > deadline:
                return SearchOutcome("unknown", branches=branches, stage="timeout")
            parents = [c[0] for c in group]
            firsts, lasts = np.stack([c[1] for c in group]), np.stack([c[2] for c in group])
            clock = time.perf_counter()
            if is_refresh:
                bounds = bounder.bound(options, np.full(len(group), sample), firsts, lasts,
                                       labels.repeat(len(group)), reference=_stack(parents, bounder.relu_inputs),
                                       deadline=deadline)
            else:
                bounds = bounder.bound(options, np.full(len(group), sample), firsts, lasts,
                                       labels.repeat(len(group)), fixed=_stack(parents, reused), deadline=deadline)
            open_ = ~(bounds.margins > 0).all(dim=1).numpy()
            idx = np.flatnonzero(open_)
            if alpha_iterations and idx.size:  # α-CROWN on the open domains' margins (`HullBounder.optimized`)
                bounds.margins[idx] = bounder.optimized(options, np.full(idx.size, sample), firsts[idx], lasts[idx],
                                                        labels.repeat(idx.size), bounds.select(idx),
                                                        alpha_iterations, deadline)
                idx = np.flatnonzero(~(bounds.margins > 0).all(dim=1).numpy())
            rates[is_refresh] = (time.perf_counter() - clock) / len(group)
            if idx.size == 0:
                continue
            if bounds.coeff_lower is not None:
                candidates = np.stack([
                    linear_minimiser(options, sample, firsts[i], lasts[i], bounds.coeff_lower[i],
                                     bounds.coeff_upper[i]) for i in idx
                ])
                wrong = misclassified(network, abstract_batch(options, np.full(len(idx), sample), candidates),
                                      label)
                if wrong.any():
                    return SearchOutcome("falsified", candidates[int(np.flatnonzero(wrong)[0])], branches, "bab")
            for i in idx:
                queue.append(Domain(
                    float(bounds.margins[i].min()), firsts[i], lasts[i], bounds.split_score[i],
                    None if bounds.coeff_lower is None else bounds.coeff_lower[i],
                    None if bounds.coeff_upper is None else bounds.coeff_upper[i],
                    bounds.intermediate_of(i), 0 if is_refresh else parents[i].age + 1,
                ))
    return SearchOutcome("verified", branches=branches, stage="bab")
