"""`abscert-sound`: is f(x') == y for every x' in the [0,1]-clipped L∞ ball, f the deployed AbsCert classifier?

f(x') = N(phi(x')) for the point variant, N(region_phi(x', eps_train)) for the region variant. Every pixel of
x' can only produce a few abstract values (`sound.choices`), so the reachable abstract inputs are a product
of small discrete sets. Per sample, in order:

1. clean      – f(x) != y is falsified with x itself; no choice pixel left means a single reachable
                abstract input, so the clean check decides.
2. enumeration – at most `enumerate_limit` reachable abstract inputs: evaluate N on all of them (exact).
3. attack     – a discrete gradient-guided attack over the choice pixels (`sound.attack`); a hit becomes a
                concrete image x' that must pass `recheck_counterexample` (f itself, ball, [0,1]).
4. bounds     – auto_LiRPA bounds over the hull of all reachable abstract inputs (`sound.bounds`): a
                batched cheap pass (IBP for all ReLU inputs but the last, CROWN after), then CROWN (or
                `bound_method`) per sample, and where that does not decide, α-CROWN on its margins over the ReLU-input
                bounds found (`sound.alpha`; by default on deep chains); all margins positive → verified.
5. bab        – branch and bound over the choice pixels (`sound.search`) until verified, a re-checked
                counterexample, or `timeout` seconds for the sample → unknown (stage 'timeout').

`verified` comes only from exact enumeration or sound bounds over a superset of the reachable set;
`falsified` only from a counterexample re-checked by running f.

Per-sample details: `choice_pixels` (pixels with >= 2 options), `branches` (BaB domains bounded, or abstract
inputs enumerated), `stage` (clean / enumeration / attack / bounds / bab / timeout), and the seconds spent in
`attack_s`, `bounds_s` and `bab_s` (complete search: enumeration or BaB). Batched stages are charged to
their samples in equal shares; `time_s` is the sum plus the sample's share of the clean stage.
Where a sample's worst margin m = min over its reachable abstract inputs z of N(z)_y - max_{j≠y} N(z)_j lies:
`attack_margin` (samples the attack ran on) is N's lowest margin on the attack's candidates, so m <= it;
`min_margin_lb` (samples the root bound did not verify) is a sound lower bound, the root bound's lowest margin
raised to branch and bound's lowest open margin when the search ends open — so for an `unknown` sample the two
bracket m, and their gap says how far the bounds are from deciding it.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..abstraction import check_eps, check_granularity
from ..budget import DEFAULT_MEMORY_MB, budget_stage, crown_batch_opts, within_budget
from ..devices import OnDevice
from ..errors import UserError
from ..sound.attack import search_choices
from ..sound.bounds import CROWN_LAST, INTERMEDIATE_MODES, LIRPA_METHODS, REFRESH_MODES, HullBounder
from ..sound.choices import PixelOptions, reachable_options
from ..sound.recheck import recheck_counterexample
from ..sound.search import SearchOutcome, branch_and_bound, enumerate_domain
from .base import VERIFIERS, SampleResult, Verifier, clean_check

QUICK_BATCH = 8  # most samples per batched pre-pass bound call (fewer when the memory budget says so)
QUICK_TIME_SHARE = 0.25  # the pre-pass may use this share of its samples' time budgets, else it is dropped
#: steps of α-CROWN on the margins of a root bound that does not decide (`sound.alpha`; each step one backward pass
#: of the K - 1 margin rows, about 10 ms on AbsCert DM_Medium; it stops early once they are positive or stall). By
#: default where the root bounds come from the forward pass (deep chains: AbsCert DM_Medium, DM_Large); opt-in
#: elsewhere. Measured (scratch probe, pixel DM_Medium, the 13 of the first 70 test images whose windowed root bound
#: does not decide): 3 become verified at the root in 0.03-0.1 s of optimisation, against 0.8-2.1 s of branch and bound.
ALPHA_ITERATIONS = 20
#: the same for the domains branch and bound leaves open: off by default (the same probe: 5 steps halved the branches
#: searched in 10 s and decided nothing more)
BAB_ALPHA_ITERATIONS = 0
TIGHT_SHARE = 0.5  # where forward root bounds do not decide, CROWN's root bound may use this share of the time left


def network_digest(network: torch.nn.Module) -> str:
    """A content hash of a module's parameters and buffers (names, shapes, dtypes and exact values)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in list(network.named_parameters()) + list(network.named_buffers()):
        value = tensor.detach().cpu().contiguous().reshape(-1)  # 0-dim buffers (BatchNorm counters) too
        digest.update(f"{name}:{tuple(tensor.shape)}:{value.dtype};".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


class SoundVerifier(Verifier):
    """Sound and complete (given time) robustness check of the deployed AbsCert classifier.

    Options: `timeout` (s per sample), `bound_method` ('crown', 'alpha-crown', 'crown-ibp', 'ibp'),
    `enumerate_limit` (enumerate exactly when at most this many abstract inputs remain; 0 disables the
    enumeration stage, BaB leaves are then single inputs), `attack` / `attack_steps` / `attack_restarts`,
    `bab_batch` (most domains per bound call), `fast_first` (the cheap batched pre-pass, dropped by itself on
    networks where it decides too few samples), `memory_mb` (memory budget of one bound call, MiB: batch sizes
    are planned from it, a sample whose bound does not fit alone is `unknown`), `crown_batch` (0: off; N > 0:
    CROWN bounds an intermediate layer's unstable neurons N at a time — auto_LiRPA's batched CROWN, the same
    bounds in less memory per step, so a wide network's bound fits the budget), `intermediate` ('auto',
    'forward', 'backward': how the ReLU-input bounds are found, see `sound.bounds.INTERMEDIATE_MODES`),
    `bab_refresh` ('auto', 'lirpa', 'windows', 'second-conv': how branch and bound recomputes a domain's ReLU-input
    bounds, see `sound.bounds.REFRESH_MODES`), `alpha_iterations` (where a root bound does not decide, at most this
    many steps of α-CROWN on the margins over the ReLU-input bounds found, `sound.alpha`; 0: off; None, the default:
    ALPHA_ITERATIONS where the root bounds come from the forward pass, off elsewhere), `bab_alpha` (the same for the
    domains a branch-and-bound call leaves open; 0, the default: off), `seed`.

    Time and memory are limits, not failures: the per-sample `timeout` covers every stage including the root
    bound (auto_LiRPA is stopped at the next layer boundary), and a sample past it is `unknown` (stage
    'timeout'); a sample whose bound exceeds the memory budget is `unknown` (stage 'memory').
    """

    name = "abscert-sound"
    meaning = ("f(x') == y for every x' in the [0,1]-clipped L∞ eps-ball, f = N(abstraction(x')) "
               "(sound; complete up to the per-sample timeout)")
    sound = True

    def __init__(
        self, timeout: float = 10.0, bound_method: str = "crown", enumerate_limit: int = 256,
        attack: bool = True, attack_steps: int = 3, attack_restarts: int = 1, bab_batch: int = 32,
        fast_first: bool = True, memory_mb: float = DEFAULT_MEMORY_MB, crown_batch: int = 0, seed: int = 0,
        intermediate: str = "auto", bab_refresh: str = "auto", alpha_iterations: int | None = None,
        bab_alpha: int = BAB_ALPHA_ITERATIONS,
    ) -> None:
        if not timeout > 0:
            raise UserError(f"abscert-sound: timeout must be > 0 seconds, got {timeout}")
        if bound_method not in LIRPA_METHODS:
            raise UserError(f"abscert-sound: unknown bound_method {bound_method!r}; valid: {', '.join(LIRPA_METHODS)}")
        if enumerate_limit < 0 or bab_batch < 1 or attack_steps < 1 or attack_restarts < 0 \
                or (alpha_iterations is not None and alpha_iterations < 0) or bab_alpha < 0:
            raise UserError("abscert-sound: enumerate_limit >= 0, bab_batch >= 1, attack_steps >= 1, "
                            "attack_restarts >= 0, alpha_iterations >= 0, bab_alpha >= 0 required")
        if not memory_mb > 0:
            raise UserError(f"abscert-sound: memory_mb must be > 0, got {memory_mb}")
        if intermediate not in INTERMEDIATE_MODES:
            raise UserError(f"abscert-sound: unknown intermediate {intermediate!r}; valid: "
                            f"{', '.join(INTERMEDIATE_MODES)}")
        if bab_refresh not in REFRESH_MODES:
            raise UserError(f"abscert-sound: unknown bab_refresh {bab_refresh!r}; valid: {', '.join(REFRESH_MODES)}")
        self.intermediate = intermediate
        self.bab_refresh = bab_refresh
        self.alpha_iterations = None if alpha_iterations is None else int(alpha_iterations)
        self.bab_alpha = int(bab_alpha)
        self.crown_opts = crown_batch_opts(self.name, crown_batch)
        self.memory_mb = float(memory_mb)
        self.timeout = float(timeout)
        self.bound_method = bound_method
        self.enumerate_limit = int(enumerate_limit)
        self.attack = bool(attack)
        self.attack_steps = int(attack_steps)
        self.attack_restarts = int(attack_restarts)
        self.bab_batch = int(bab_batch)
        self.fast_first = bool(fast_first)
        self.seed = int(seed)
        self._engine: tuple[torch.nn.Module, str, HullBounder] | None = None  # (network, digest, engine)

    def applies_to(self, trained) -> bool:
        return trained.abstraction is not None

    # -- public protocol -------------------------------------------------------------------------------

    def verify(self, trained, x: torch.Tensor, y: torch.Tensor, eps: float, indices=None, batch_size: int = 64,
               progress: Callable[[int], None] | None = None) -> list[SampleResult]:
        """Per-sample results; time_s is the sample's share of batched stages plus its own bounds and BaB."""
        self._check(trained, x, y, eps)
        return super().verify(trained, x, y, eps, indices, batch_size, progress)

    def timed_batch(self, trained, x, y, eps):
        """(status, counterexample, details, seconds) per sample, timed stage by stage."""
        return self._run(trained, x, y, self._check(trained, x, y, eps))

    def verify_batch(self, trained, x, y, eps):
        """(status, counterexample, details) per sample of one batch."""
        eps = self._check(trained, x, y, eps)
        return [(status, cex, details) for status, cex, details, _ in self._run(trained, x, y, eps)]

    # -- checks ----------------------------------------------------------------------------------------

    def _check(self, trained, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
        if not self.applies_to(trained):
            raise UserError(f"verifier {self.name} needs an AbsCert model (one with an abstraction)")
        eps = check_eps(eps)
        check_granularity(trained.abstraction.d)
        check_eps(trained.abstraction.eps)
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise UserError(f"images must be an N×C×H×W tensor, got {getattr(x, 'shape', type(x))}")
        if tuple(x.shape[1:]) != tuple(trained.input_shape):
            raise UserError(f"images of shape {tuple(x.shape[1:])} (channels {x.shape[1]}); the model expects "
                            f"{tuple(trained.input_shape)}")
        if not torch.isfinite(x).all():
            raise UserError("images contain NaN or inf")
        if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            raise UserError("pixel values must lie in [0, 1]")
        if len(y) != len(x) or (len(y) and (int(y.min()) < 0 or int(y.max()) >= trained.num_classes)):
            raise UserError(f"labels must be {len(x)} class ids in 0..{trained.num_classes - 1}")
        return eps

    def bounder(self, trained) -> HullBounder:
        """The bound engine for this network, built once and rebuilt whenever its weights changed.

        The cache key is a content hash of every parameter and buffer (`network_digest`): in-place edits
        that keep shapes, sums or data pointers (a permutation, `p.data.copy_`) still change it, so a
        reused verifier never bounds a stale copy of the network.
        """
        network = trained.network
        digest = network_digest(network)
        if self._engine is None or self._engine[0] is not network or self._engine[1] != digest:
            self._engine = (network, digest, HullBounder(trained, self.bound_method, self.memory_mb,
                                                              self.crown_opts, self.intermediate,
                                                              self.bab_refresh))
        return self._engine[2]

    def alpha_steps(self, bounder: HullBounder) -> int:
        """Steps of α-CROWN on a root bound's margins for this network (see `alpha_iterations`)."""
        if self.alpha_iterations is not None:
            return self.alpha_iterations
        return ALPHA_ITERATIONS if bounder.forward_on else 0

    # -- the pipeline ----------------------------------------------------------------------------------

    def _run(self, trained, x: torch.Tensor, y: torch.Tensor, eps: float):
        """(status, counterexample, details, seconds) per sample, stage by stage."""
        if len(x) == 0:
            return []
        run = _BatchRun(self, trained, x, y, eps)
        run.clean_stage()
        run.enumeration_stage()
        if self.attack:
            run.attack_stage()
        run.bound_and_search_stage()
        return run.answers()


class _BatchRun:
    """The state of one batch going through the stages: per-sample status, counterexample, details, time."""

    def __init__(self, verifier: SoundVerifier, trained, x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
        self.verifier, self.trained, self.eps = verifier, trained, eps
        self.x = x.detach().cpu().to(torch.float32)
        self.y = y.detach().cpu().to(torch.int64)
        self.network = OnDevice(trained.network.eval())  # forward passes on the network's device
        n = len(x)
        self.seconds = np.zeros(n)
        self.status: list[str | None] = [None] * n
        self.cex: list[np.ndarray | None] = [None] * n
        self.details = [{"choice_pixels": 0, "branches": 0, "stage": "", "attack_s": 0.0, "bounds_s": 0.0,
                         "bab_s": 0.0} for _ in range(n)]
        self.options: PixelOptions | None = None  # set by clean_stage, the first stage

    # bookkeeping

    def open(self) -> list[int]:
        """Samples not decided yet."""
        return [i for i, s in enumerate(self.status) if s is None]

    def charge(self, clock: float, members, key: str | None = None) -> None:
        """Spread the wall time since `clock` equally over `members` (and onto their stage time `key`)."""
        members = list(members)
        if not members:
            return
        part = (time.perf_counter() - clock) / len(members)
        for i in members:
            self.seconds[i] += part
            if key:
                self.details[i][key] += part

    def decide(self, i: int, verdict: str, stage: str, counterexample: np.ndarray | None = None) -> None:
        self.status[i], self.cex[i] = verdict, counterexample
        self.details[i]["stage"] = stage

    def conclude(self, i: int, outcome: SearchOutcome) -> None:
        """Record a search outcome; a counterexample counts only after the independent re-check."""
        self.details[i]["branches"] = outcome.branches
        if "margin_lb" in outcome.notes:  # an open search's lower bound on the worst margin (starts at the root's)
            self.details[i]["min_margin_lb"] = outcome.notes["margin_lb"]
        if outcome.status != "falsified":
            self.decide(i, outcome.status, outcome.stage)
            return
        assert self.options is not None and outcome.choice is not None  # a falsified outcome carries its choice
        x_adv = self.options.concrete(i, outcome.choice)
        ok, message = recheck_counterexample(self.trained, self.x[i], int(self.y[i]), self.eps, x_adv)
        if ok:
            self.decide(i, "falsified", outcome.stage, x_adv)
        else:  # N and f disagree on this abstract input: claim nothing
            self.details[i]["note"] = f"counterexample failed the re-check: {message}"
            self.decide(i, "unknown", outcome.stage)

    def root_first(self, k: int) -> np.ndarray:
        """Option index 0 for every pixel of k root domains."""
        assert self.options is not None
        return np.zeros((k, self.options.count.shape[1]), dtype=np.int64)

    def answers(self):
        for i in self.open():  # unreachable: every stage path decides
            self.decide(i, "unknown", "timeout")
        return [(self.status[i], self.cex[i], self.details[i], float(self.seconds[i]))
                for i in range(len(self.status))]

    # stages

    def clean_stage(self) -> None:
        """Clean check and reachable options; no choice pixel left means a single abstract input."""
        clock = time.perf_counter()
        correct = clean_check(OnDevice(self.trained.classifier()), self.x, self.y).numpy()
        self.options = reachable_options(self.trained.abstraction, self.x, self.eps)
        self.charge(clock, range(len(self.x)))
        for i in range(len(self.x)):
            self.details[i]["choice_pixels"] = int((self.options.count[i] > 1).sum())
            if not correct[i]:
                self.details[i]["reason"] = "clean misclassified"
                self.decide(i, "falsified", "clean", self.x[i].numpy().copy())
            elif self.details[i]["choice_pixels"] == 0:
                self.decide(i, "verified", "clean")

    def enumeration_stage(self) -> None:
        """Exact check of samples with at most `enumerate_limit` reachable abstract inputs (time: bab_s)."""
        assert self.options is not None
        for i in self.open():
            combinations = self.options.combinations(i)
            if combinations > self.verifier.enumerate_limit:
                continue
            clock = time.perf_counter()
            hit = enumerate_domain(self.network, self.options, i, int(self.y[i]), self.root_first(1)[0],
                                   self.options.count[i] - 1)
            self.conclude(i, SearchOutcome("verified" if hit is None else "falsified", hit,
                                           int(combinations), "enumeration"))
            self.charge(clock, [i], "bab_s")

    def attack_stage(self) -> None:
        """Discrete attack, batched over the undecided samples; hits must pass the re-check."""
        assert self.options is not None
        members = self.open()
        if not members:
            return
        clock = time.perf_counter()
        v = self.verifier
        found, _, margins = search_choices(self.network, self.options, np.asarray(members), self.y[members],
                                           v.attack_steps, v.attack_restarts, v.seed)
        for position, i in enumerate(members):  # N's lowest margin on a reachable input: the worst margin is <= it
            self.details[i]["attack_margin"] = float(margins[position])
        for position, choice in found.items():
            i = members[position]
            x_adv = self.options.concrete(i, choice)
            ok, message = recheck_counterexample(self.trained, self.x[i], int(self.y[i]), self.eps, x_adv)
            if ok:
                self.decide(i, "falsified", "attack", x_adv)
            else:
                self.details[i]["attack_note"] = message
        self.charge(clock, members, "attack_s")

    def bound_and_search_stage(self) -> None:
        """A cheap batched bound pre-pass, the full bound per sample, then branch and bound."""
        options = self.options
        assert options is not None
        pending = self.open()
        if not pending:
            return
        v = self.verifier
        bounder = v.bounder(self.trained)
        if v.fast_first and v.bound_method in ("crown", "alpha-crown"):
            self.quick_stage(bounder, pending)
            pending = self.open()
        for i in pending:
            plain = bounder.plain_useful()  # plain forward bounds first, receptive-field windows if they fail
            root = self.root_bound(bounder, i, 1.0, **({"window": False} if plain else {}))
            if plain and not isinstance(root, BaseException) and root.forward:
                bounder.plain_tried += 1
                if bool((root.margins[0] > 0).all()):
                    bounder.plain_decided += 1
                else:
                    windowed = self.root_bound(bounder, i, 1.0, window=True)
                    if isinstance(windowed, BaseException):
                        self.details[i]["window_note"] = f"windowed root bound stopped: {windowed}"
                    else:
                        root = windowed
            if isinstance(root, BaseException):
                self.details[i]["note"] = f"root bound stopped: {root}"
                self.decide(i, "unknown", budget_stage(root))
                continue
            # the cheap bounds did not decide: CROWN's tighter ones, given part of the time (not for alpha-CROWN,
            # whose saved slopes assume calls with given ReLU-input bounds from then on; not where the windows
            # gave the conv layers CROWN's bounds already)
            if not bool((root.margins[0] > 0).all()) and root.forward and not bounder.window_on \
                    and v.bound_method != "alpha-crown":
                tight = self.root_bound(bounder, i, TIGHT_SHARE, reference=root.intermediate, intermediate="backward")
                if isinstance(tight, BaseException):
                    self.details[i]["tight_note"] = f"CROWN root bound stopped: {tight}"
                else:
                    root = tight
            if not bool((root.margins[0] > 0).all()) and v.alpha_steps(bounder):
                margins = self.optimized_root(bounder, i, root)
                if isinstance(margins, BaseException):
                    self.details[i]["alpha_note"] = f"optimised root margins stopped: {margins}"
                else:
                    root.margins = margins
            if bool((root.margins[0] > 0).all()):
                self.decide(i, "verified", "bounds")
                continue
            self.details[i]["min_margin_lb"] = float(root.margins[0].min())
            clock = time.perf_counter()
            deadline = clock + max(0.0, v.timeout - self.seconds[i])
            self.conclude(i, branch_and_bound(bounder, self.network, options, i, int(self.y[i]), root,
                                              deadline, v.bab_batch, v.enumerate_limit, alpha_iterations=v.bab_alpha))
            self.charge(clock, [i], "bab_s")

    def root_bound(self, bounder: HullBounder, i: int, share: float, **options: Any):
        """Sample i's bound over its whole hull within `share` of its time left (charged to bounds_s): DomainBounds,
        or the budget exception that stopped it."""
        return self.on_root(i, share, lambda opts, deadline: bounder.bound(
            opts, np.array([i]), self.root_first(1), opts.count[i][None] - 1, self.y[i:i + 1], deadline=deadline,
            **options))

    def optimized_root(self, bounder: HullBounder, i: int, root):
        """Sample i's root margins with their slopes optimised over the root's ReLU-input bounds (α-CROWN on the
        output only, `HullBounder.optimized`), within its time left (charged to bounds_s): the margins, or the budget
        exception that stopped the optimisation."""
        return self.on_root(i, 1.0, lambda opts, deadline: bounder.optimized(
            opts, np.array([i]), self.root_first(1), opts.count[i][None] - 1, self.y[i:i + 1], root,
            self.verifier.alpha_steps(bounder), deadline))

    def on_root(self, i: int, share: float, call: Callable[[PixelOptions, float], Any]):
        """call(options, deadline) on sample i's root domain with `share` of its time left, charged to bounds_s: its
        result, or the budget exception that stopped it."""
        clock = time.perf_counter()
        deadline = clock + share * max(0.0, self.verifier.timeout - self.seconds[i])
        opts = self.options
        assert opts is not None
        result = within_budget(lambda: call(opts, deadline))
        self.charge(clock, [i], "bounds_s")
        return result

    def quick_stage(self, bounder: HullBounder, pending: list[int]) -> None:
        """The cheap pre-pass (IBP for all ReLU inputs but the last, CROWN after) in memory-planned batches.

        Dropped for the rest of the network's life once it decides too few samples (`HullBounder.quick_useful`),
        or when it would take more than QUICK_TIME_SHARE of its samples' time or
        does not fit the memory budget for a single sample.
        """
        v = self.verifier

        def quick(members):
            return bounder.bound(self.options, np.asarray(members), self.root_first(len(members)),
                                 self.options.count[members] - 1, self.y[members], method=CROWN_LAST)

        options = self.options
        assert options is not None
        if bounder.forward_on is None:  # decide the bound path first: the pre-pass is off where forward bounds are on
            first = pending[:1]
            x_lo, x_hi, _ = bounder.box(options, np.asarray(first), self.root_first(1), options.count[first] - 1)
            bounder.use_forward(x_lo, x_hi)
        if not bounder.quick_useful():
            return
        clock = time.perf_counter()
        for members, bounds in bounder.planner.chunks(
                quick, pending, QUICK_BATCH,
                deadline=lambda members: time.perf_counter() + QUICK_TIME_SHARE * v.timeout * len(members)):
            self.charge(clock, members, "bounds_s")
            clock = time.perf_counter()
            if isinstance(bounds, BaseException):  # too slow or too big for one sample: not worth it here
                bounder.quick_off = True
                return
            decided = (bounds.margins > 0).all(dim=1).tolist()
            bounder.quick_tried += len(members)
            bounder.quick_decided += sum(decided)
            for i, ok in zip(members, decided):
                if ok:
                    self.decide(i, "verified", "bounds")
            if not bounder.quick_useful():
                return


@VERIFIERS.register("abscert-sound", title="AbsCert sound", long_title="AbsCert sound (deployed f)", order=20,
                    cost=400.0, group="abscert")
def abscert_sound(timeout: float = 10.0, **options: Any) -> Verifier:
    """The sound (and, given time, complete) check of the deployed AbsCert classifier."""
    return SoundVerifier(timeout=timeout, **options)
