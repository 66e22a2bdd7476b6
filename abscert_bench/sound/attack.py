"""Discrete attack over the choice pixels: look for a reachable abstract input N misclassifies.

A candidate is one option index per pixel. The search is gradient-guided on the relaxed hull: the
gradient g of the margin logit_y - max_{j≠y} logit_j with respect to N's input ranks, per pixel, how much
moving to each option is estimated to lower the margin (g_lower·Δlower + g_upper·Δupper); candidates are
rounded to the allowed options (the best-estimated option of every pixel, or of only the top fraction of
pixels by estimated gain), iterated a few steps, from the clean choice and from random restarts. Every
candidate is scored by a real forward pass of N; the caller turns hits into concrete images and re-checks
them with the deployed classifier — this module never decides `falsified` on its own.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .choices import PixelOptions

FRACTIONS = (1.0, 0.5, 0.25, 0.1)


def abstract_batch(options: PixelOptions, samples: np.ndarray, choice: np.ndarray) -> torch.Tensor:
    """N's inputs (n × 2C × H × W) for one option index per pixel of each listed sample (choice: n × P)."""
    rows = np.arange(choice.shape[1])[None, :]
    s = samples[:, None]
    lower = options.lower[s, rows, choice]
    upper = options.upper[s, rows, choice]
    c, h, w = options.image_shape
    both = np.concatenate([lower, upper], axis=1).reshape(len(samples), 2 * c, h, w)
    return torch.from_numpy(np.ascontiguousarray(both))


def margins_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logit_y - max_{j≠y} logit_j for each row."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(torch.nn.functional.one_hot(labels, logits.shape[1]).bool(), -torch.inf)
    return true - others.max(dim=1).values


def margins_of(network: nn.Module, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logit_y - max_{j≠y} logit_j of N on the abstract inputs z."""
    return margins_from_logits(network(z), labels)


def _gradient(network: nn.Module, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Gradient of the margins with respect to N's input (works inside a caller's no_grad block too)."""
    with torch.enable_grad():
        z = z.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(margins_of(network, z, labels).sum(), z)
    return grad


def _step_candidates(options, samples, choice, grad, fractions, valid) -> list[np.ndarray]:
    """Rounded candidates from one linearisation: per pixel the option with the lowest estimated margin."""
    n, p = choice.shape
    g = grad.reshape(n, 2, -1).numpy().astype(np.float64)
    rows = np.arange(p)[None, :]
    s = samples[:, None]
    cur_l = options.lower[s, rows, choice][:, :, None]
    cur_u = options.upper[s, rows, choice][:, :, None]
    delta = g[:, 0, :, None] * (options.lower[samples] - cur_l) + g[:, 1, :, None] * (options.upper[samples] - cur_u)
    delta = np.where(valid, delta, np.inf)
    best = delta.argmin(axis=2)
    gain = -delta.min(axis=2)  # estimated margin decrease of the pixel's best move (>= 0)
    out = []
    for fraction in fractions:
        if fraction >= 1.0:
            out.append(np.where(gain > 0, best, choice))
            continue
        k = np.maximum(1, (np.sum(gain > 0, axis=1) * fraction).astype(int))
        order = np.argsort(-gain, axis=1)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(p)[None, :].repeat(n, 0), axis=1)
        take = (rank < k[:, None]) & (gain > 0)
        out.append(np.where(take, best, choice))
    return out


def random_choices(options: PixelOptions, samples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One option index per pixel of each listed sample, uniform over that pixel's options (n × P)."""
    count = options.count[samples]
    return np.minimum((rng.random(count.shape) * count).astype(np.int64), count - 1)


def _device(network: nn.Module) -> torch.device:
    parameter = next(network.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def search_choices(
    network: nn.Module, options: PixelOptions, samples: np.ndarray, labels: torch.Tensor,
    steps: int = 3, restarts: int = 1, seed: int = 0, stop_on_hit: bool = True,
) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
    """The gradient-guided discrete search (module docstring), from the clean choice and `restarts` random starts.

    Returns (hits, worst, margin): `worst` (n × P) the lowest-margin choice seen per sample and `margin` its margin.
    With `stop_on_hit` (the verifier's attack) a sample leaves the search at its first misclassified candidate,
    recorded in `hits` keyed by position in `samples`; without (the adversarial training loss) every sample runs
    every step of every start and `hits` stays empty.
    """
    n = len(samples)
    found: dict[int, np.ndarray] = {}
    worst = options.clean[samples].copy()
    worst_margin = np.full(n, np.inf)
    if n == 0:
        return found, worst, worst_margin
    device = _device(network)
    labels = labels.to(device)
    rng = np.random.default_rng(seed)
    count = options.count[samples]
    valid = np.arange(options.lower.shape[2])[None, None, :] < count[:, :, None]
    starts = [options.clean[samples].copy()] + [random_choices(options, samples, rng) for _ in range(restarts)]
    for start in starts:
        active = np.array([i for i in range(n) if not (stop_on_hit and i in found)], dtype=np.int64)
        if active.size == 0:
            break
        choice = start[active]
        for _ in range(max(1, steps)):
            z = abstract_batch(options, samples[active], choice).to(device)
            grad = _gradient(network, z, labels[active]).cpu()
            candidates = _step_candidates(options, samples[active], choice, grad, FRACTIONS, valid[active])
            stacked = np.concatenate([choice[None]] + [c[None] for c in candidates], axis=0)  # k × n × P
            k = stacked.shape[0]
            flat = stacked.reshape(k * len(active), -1)
            with torch.no_grad():
                repeated = labels[active].repeat(k)
                logits = network(abstract_batch(options, np.tile(samples[active], k), flat).to(device))
                cand_margin = margins_from_logits(logits, repeated).view(k, len(active))
                wrong = (logits.argmax(dim=1) != repeated).view(k, len(active))
            # Prefer a misclassified candidate (argmax != y, ties as the classifier breaks them).
            score = torch.where(wrong, torch.full_like(cand_margin, -torch.inf), cand_margin) if stop_on_hit \
                else cand_margin
            best = score.argmin(dim=0).cpu().numpy()
            choice = stacked[best, np.arange(len(active))]
            margin = cand_margin.double().cpu().numpy()[best, np.arange(len(active))]
            better = margin < worst_margin[active]
            worst[active[better]] = choice[better]
            worst_margin[active[better]] = margin[better]
            if not stop_on_hit:
                continue
            hit = wrong.any(dim=0).cpu().numpy()
            for j in np.flatnonzero(hit):
                found[int(active[j])] = choice[j].copy()
            keep = ~hit
            if not keep.any():
                break
            active, choice = active[keep], choice[keep]
    return found, worst, worst_margin

