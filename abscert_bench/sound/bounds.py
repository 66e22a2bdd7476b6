"""Sound margin bounds over the hull of a set of reachable abstract inputs, through auto_LiRPA.

A *domain* is, per pixel, a contiguous range [first, last] of that pixel's options (see `choices`); its
hull is the box spanned by the options `first` and `last` (both ends are monotone in the option index).

Region variant: the two ends move independently, so the bounds run over the 2C-channel box of N's input.

Point variant: the upper end is tied to the lower end (upper = min(lower + d, 1)); a plain 2C box would lose
that. `models.hull.PointHullNetwork` keeps it with the relu form `1 - relu(1 - (lower + d))`, but in float32
that form is not exact on the hull's vertices: cell_lower(k) = fl(k·d) and cell_upper(k) = fl((k+1)·d)
are rounded separately, so min(cell_lower(k) + fl(d), 1) misses cell_upper(k) by an ulp for many k
(d = 0.2: cells 0 and 1; d = 0.1: cells 0, 1, 3, 6, 8), i.e. it would bound a slightly different function.
We bound instead the *gap form*: the input is [lower end, gap] with gap = upper - lower, and the network
is N(cat[lower, lower + gap]). The gap of every option is computed exactly (float32 numbers subtract
exactly in float64) and its box rounded outward, so every vertex of the hull is exactly the abstract
input [cell_lower(k), cell_upper(k)] the deployed classifier feeds N; the gap box is ~1e-8 wide, so the
correlation is kept (only a range reaching the clipped last cell of a d that does not divide 1 gets a
wide gap box: sound, just looser). Because N's first layer is linear in its input, the gap form folds into
N's first layer (weights [W_lower + W_upper, W_upper] on [lower, gap]; zero padding stays exact since
a padded lower and gap of 0 mean a padded upper of 0). With the fold, auto_LiRPA sees an ordinary network
whose first layer takes the perturbed input directly, which it bounds about twice as fast as the relu
form (no extra relu layer, no concatenation to unfold). Networks whose first layer cannot be folded use
an explicit linear pre-map instead (`GapHullNetwork`), which also takes N's fixed first-layer normalisation
(the official AbsCert protocol's [-1, 1] Normalize) when there is one.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..budget import DEFAULT_MEMORY_MB, BatchPlanner, OutOfMemoryBudget, guarded
from ..devices import module_device
from ..lirpa import LIRPA_METHODS, bounded_input, margin_matrix
from ..lirpa_compat import lirpa
from .alpha import optimized_margins
from .choices import PixelOptions
from .forward import ForwardBounds
from .second import SecondLayerBounds

#: A cheaper sound pre-pass: IBP bounds for every ReLU layer's input except the last, CROWN for the last
#: and for the margins. On a conv net almost all of CROWN's cost is the intermediate bounds of the early,
#: wide layers; this pass skips them and still decides most easy samples (MNIST DM_Small: ~2x faster).
CROWN_LAST = "crown-last"
QUICK_MIN_TRIED, QUICK_MIN_SHARE = 16, 0.05  # the cheap pre-pass is dropped once it decides < 5 % of 16+ samples
#: How the bounds on the ReLU inputs are found: 'forward' (`forward.ForwardBounds`, over the moving input
#: coordinates only), 'backward' (auto_LiRPA's CROWN for every layer), 'auto' (forward where the chain is
#: supported, has at least FORWARD_MIN_RELUS ReLU layers and its 2k coefficient maps are fewer than the
#: widest ReLU layer's neurons, CROWN's backward rows for that layer; backward otherwise). The margins always
#: come from one CROWN backward pass. On MNIST DM_Small (3 ReLU layers) CROWN with the IBP pre-pass was the
#: faster; on DM_Medium (6) the forward bounds are (results/sound-benchmark/table.md).
INTERMEDIATE_MODES = ("auto", "forward", "backward")
#: How a branch-and-bound refresh (every ReLU input's bounds recomputed, tightened by the parent's) is computed:
#: 'lirpa' — auto_LiRPA's CROWN with the parent's bounds as reference; 'windows' — CROWN of the neurons the
#: parent's bounds leave unstable, over receptive fields on conv layers (`forward.ForwardBounds.refreshed`), on
#: chain networks (others keep 'lirpa'); 'second-conv' — on networks that start Conv → ReLU → Conv → ReLU, the first two
#: ReLU layers' bounds by `second.SecondLayerBounds` (CROWN of the second convolution's unstable neurons in one matrix
#: product; auto_LiRPA spends most of a DM_Small refresh on them), the later ones as 'lirpa' (others keep 'lirpa');
#: 'auto' (the default) — 'windows' where the root bounds come from the forward pass (`use_forward`: deep chains with
#: few choice pixels, AbsCert DM_Medium / DM_Large), 'lirpa' elsewhere. Measured on DM_Large (first 20 pixel images,
#: 10 s): a 'lirpa' refresh takes 1.5–3 s a domain there, a 'windows' one about 1 s, and only the latter verified
#: anything in branch and bound.
REFRESH_MODES = ("auto", "lirpa", "windows", "second-conv")
FORWARD_MIN_RELUS = 4
#: A CROWN pass the memory budget refuses is run again with auto_LiRPA's batched CROWN, this many unstable
#: neurons of a layer at a time (the same bounds in a fraction of the memory; see `crown_batch`)
FALLBACK_CROWN_BATCH = 2048
#: On a chain with convolutional ReLU layers the forward pass can also tighten each conv layer's unstable neurons
#: by CROWN over their receptive fields (`forward.ForwardBounds._window_back`: CROWN's bounds for those neurons,
#: at a cost that grows with the unstable neurons). Measured (results/sound-benchmark/table.md): on AbsCert
#: DM_Large the plain forward root never decides and the windowed one decides about half the samples; on DM_Medium
#: the plain one decides most and the windows only add time. So a root bound tries the plain forward bounds first
#: while they decide at least QUICK_MIN_SHARE of the first PLAIN_MIN_TRIED+ samples, then the windowed ones.
PLAIN_MIN_TRIED = 2


class GapHullNetwork(nn.Module):
    """[lower ends, gaps] (2C channels) in; N([lower, lower + gap]) out (the unfolded gap form).

    With `normalize` = (mean, std) the pre-map also applies N's fixed first layer (x - mean) / std (a 1×1
    convolution with bias: the same affine map), and `network` is the rest of N. auto_LiRPA 0.3 cannot bound
    a per-channel Sub/Div feeding a padded convolution in patches mode, and folding the normalisation into
    that convolution would not be exact (its zero padding would stand for pixel `mean`, not 0); after the
    pre-map the convolution pads the normalised tensor with zeros exactly as N does. `gap=False` keeps the
    channels as they are (the region variant's [lower, upper] box).
    """

    def __init__(self, network: nn.Module, channels: int, normalize: tuple[torch.Tensor, torch.Tensor] | None = None,
                 gap: bool = True) -> None:
        super().__init__()
        self.network = network
        self.channels = channels
        eye = torch.eye(channels)
        if gap:
            weight = torch.cat([torch.cat([eye, torch.zeros_like(eye)], 1), torch.cat([eye, eye], 1)], 0)
        else:
            weight = torch.eye(2 * channels)
        bias = torch.zeros(2 * channels)
        if normalize is not None:
            mean, std = (t.reshape(-1).to(torch.float32) for t in normalize)
            weight = weight / std[:, None]
            bias = -mean / std
        self.premap = nn.Conv2d(2 * channels, 2 * channels, 1, bias=normalize is not None)
        self.premap.weight.data = weight.view(2 * channels, 2 * channels, 1, 1)
        self.premap.weight.requires_grad_(False)
        if normalize is not None:
            assert self.premap.bias is not None  # bias=True when normalize is given
            self.premap.bias.data = bias
            self.premap.bias.requires_grad_(False)

    def forward(self, lower_gap: torch.Tensor) -> torch.Tensor:
        return self.network(self.premap(lower_gap))


def split_normalize(network: nn.Module) -> tuple[tuple[torch.Tensor, torch.Tensor], nn.Module] | None:
    """((mean, std), rest of N) when N = Sequential(Normalize, …) (models.create_model(normalize=…)), else None."""
    from ..models.registry import Normalize

    if isinstance(network, nn.Sequential) and len(network) > 1 and isinstance(network[0], Normalize):
        rest = network[1] if len(network) == 2 else nn.Sequential(*list(network)[1:])
        return (network[0].mean, network[0].std), rest
    return None


def fold_gap_form(network: nn.Module, channels: int) -> nn.Module | None:
    """N with its first layer rewritten to take [lower, gap] (None when the first layer can't be folded)."""
    if not isinstance(network, nn.Sequential) or len(network) == 0:
        return None
    folded = copy.deepcopy(network)
    first = folded[0]
    if isinstance(first, nn.Conv2d) and first.groups == 1 and first.padding_mode == "zeros" \
            and first.in_channels == 2 * channels:
        weight = first.weight.data
        first.weight.data = torch.cat([weight[:, :channels] + weight[:, channels:], weight[:, channels:]], 1)
        return folded
    if isinstance(first, nn.Flatten) and len(folded) > 1 and isinstance(folded[1], nn.Linear):
        linear = folded[1]
        half = linear.in_features // 2
        weight = linear.weight.data
        linear.weight.data = torch.cat([weight[:, :half] + weight[:, half:], weight[:, half:]], 1)
        return folded
    return None


def round_down(values: np.ndarray) -> np.ndarray:
    """Largest float32 <= each float64 value."""
    out = np.asarray(values, dtype=np.float64).astype(np.float32)
    below = out.astype(np.float64) > values
    out[below] = np.nextafter(out[below], np.float32(-np.inf))
    return out


def round_up(values: np.ndarray) -> np.ndarray:
    """Smallest float32 >= each float64 value."""
    out = np.asarray(values, dtype=np.float64).astype(np.float32)
    above = out.astype(np.float64) < values
    out[above] = np.nextafter(out[above], np.float32(np.inf))
    return out


@dataclass
class DomainBounds:
    """Margin lower bounds (n × (K-1)); per-pixel split scores and the worst margin's linear bound.

    `coeff_lower` / `coeff_upper` (n × P) are the coefficients of the abstract lower / upper ends in the
    linear lower bound of the worst margin (None for IBP); `split_score` = |coefficient| × box width,
    the part of the bound's looseness a pixel's width accounts for.
    """

    margins: torch.Tensor
    split_score: np.ndarray
    coeff_lower: np.ndarray | None
    coeff_upper: np.ndarray | None
    intermediate: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    forward: bool = False  # the ReLU-input bounds came from the forward pass (`forward.ForwardBounds`)

    def select(self, index: np.ndarray) -> DomainBounds:
        """The bounds of the domains `index` only."""
        return DomainBounds(
            self.margins[index], self.split_score[index],
            None if self.coeff_lower is None else self.coeff_lower[index],
            None if self.coeff_upper is None else self.coeff_upper[index],
            None if self.intermediate is None else {name: (lo[index], hi[index])
                                                    for name, (lo, hi) in self.intermediate.items()},
            self.forward)

    def intermediate_of(self, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """Domain i's bounds on every ReLU layer's input (batch dimension of 1), or None."""
        if self.intermediate is None:
            return None
        return {name: (lo[i:i + 1].clone(), hi[i:i + 1].clone()) for name, (lo, hi) in self.intermediate.items()}


class HullBounder:
    """auto_LiRPA bounds over domain hulls for one trained AbsCert model; the BoundedModule is built once."""

    def __init__(self, trained, method: str = "crown", memory_mb: float = DEFAULT_MEMORY_MB,
                 bound_opts: dict | None = None, intermediate: str = "auto", refresh: str = "auto") -> None:
        if method not in LIRPA_METHODS and method != CROWN_LAST:
            raise ValueError(f"unknown bound method {method!r}")
        if intermediate not in INTERMEDIATE_MODES:
            raise ValueError(f"unknown intermediate-bound mode {intermediate!r}")
        if refresh not in REFRESH_MODES:
            raise ValueError(f"unknown refresh mode {refresh!r}")
        self.method = method
        self.variant = trained.abstraction.variant
        self.num_classes = trained.num_classes
        self.image_shape = tuple(trained.input_shape)
        c, h, w = self.image_shape
        trained.network.eval()
        normalized = split_normalize(trained.network)
        self.folded = False
        if normalized is not None:  # N's fixed normalisation goes into the pre-map (see GapHullNetwork)
            self.module: nn.Module = GapHullNetwork(normalized[1], c, normalized[0], gap=self.variant == "point")
        elif self.variant == "point":
            folded = fold_gap_form(trained.network, c)
            self.folded = folded is not None
            self.module = folded if folded is not None else GapHullNetwork(trained.network, c)
        else:
            self.module = trained.network
        self.device = module_device(trained.network)  # bounds are computed where the network lives
        self.module = self.module.to(self.device).eval()
        self.bounded = lirpa().BoundedModule(self.module, torch.zeros(1, 2 * c, h, w, device=self.device),
                                             bound_opts=bound_opts or None, device=self.device)
        self.batched = bool((bound_opts or {}).get("crown_batch_size"))
        # every bound call runs under a deadline and a memory budget; batch sizes follow the measured memory
        self.planner = BatchPlanner(memory_mb, guarded(self.bounded), self.device)
        self.quick_tried = self.quick_decided = 0
        self.quick_off = False
        self.relu_inputs = [node.inputs[0].name for node in self.bounded._modules.values()
                            if type(node).__name__ == "BoundRelu"]
        self.intermediate = intermediate
        self.forward = None if intermediate == "backward" else ForwardBounds.of(self.module)
        if self.forward is not None and self.forward.relus != len(self.relu_inputs):
            self.forward = None
        self.refresh = refresh
        # refresh 'second-conv': the first two ReLU layers' bounds by `second.SecondLayerBounds` (Conv → ReLU → Conv →
        # ReLU networks; others refresh as 'lirpa')
        self.second = SecondLayerBounds.of(self.module) if refresh == "second-conv" and len(self.relu_inputs) >= 2 \
            else None
        if intermediate == "forward" and self.forward is None:
            raise ValueError("forward intermediate bounds need a chain of Conv2d / Linear / BatchNorm / ReLU layers")
        self.forward_on: bool | None = None  # decided by use_forward
        # forward bounds can use receptive-field windows where a ReLU layer is a C×H×W map
        self.window_on = self.forward is not None and any(
            len(self.bounded[name].output_shape) == 4 for name in self.relu_inputs)
        self.plain_tried = self.plain_decided = 0
        self.widest = max((int(np.prod(self.bounded[name].output_shape[1:])) for name in self.relu_inputs),
                          default=0)

    def use_forward(self, x_lo: torch.Tensor, x_hi: torch.Tensor) -> bool:
        """Whether ReLU-input bounds come from the forward pass (see INTERMEDIATE_MODES). 'auto' decides on
        the first box it sees and keeps to it (alpha-CROWN's saved slopes assume one kind of call)."""
        if self.forward is None:
            return False
        if self.forward_on is None:
            self.forward_on = self.intermediate == "forward" or (
                len(self.relu_inputs) >= FORWARD_MIN_RELUS and 2 * ForwardBounds.variables(x_lo, x_hi) < self.widest)
        return self.forward_on

    def windows_refresh(self) -> bool:
        """Whether a branch-and-bound refresh is `ForwardBounds.refreshed` (see REFRESH_MODES)."""
        if self.forward is None:
            return False
        return self.refresh == "windows" or (self.refresh == "auto" and bool(self.forward_on))

    def plain_useful(self) -> bool:
        """Whether a root bound should try the forward bounds without windows first (see PLAIN_MIN_TRIED)."""
        return self.window_on and (self.plain_tried < PLAIN_MIN_TRIED
                                   or self.plain_decided >= QUICK_MIN_SHARE * self.plain_tried)

    def quick_useful(self) -> bool:
        """Whether the cheap pre-pass still pays on this network: it decides at least QUICK_MIN_SHARE of the
        samples it was tried on (judged after QUICK_MIN_TRIED). Measured: where it decides a third or more
        (AbsCert DM_Small) it shortens the median even at an even mean pay-off, since the samples it decides skip
        the full bound (official DM_Small: median 24 ms with it, 49 ms without, same wall time); where it decides
        none (AbsCert DM_Medium, DM_Large: IBP intermediate bounds far too loose) it only costs."""
        if self.quick_off or self.forward_on:  # forward root bounds are cheap themselves
            return False
        return self.quick_tried < QUICK_MIN_TRIED or self.quick_decided >= QUICK_MIN_SHARE * self.quick_tried

    def _ibp_intermediate(self, inputs) -> dict:
        """IBP bounds of every ReLU layer's input except the last one (for CROWN_LAST)."""
        if len(self.relu_inputs) < 2:
            return {}
        self.bounded.compute_bounds(x=inputs, method="IBP", bound_upper=True)
        return {name: (self.bounded[name].lower.detach().clone(), self.bounded[name].upper.detach().clone())
                for name in self.relu_inputs[:-1]}

    def _forward_intermediate(self, x_lo, x_hi, fixed, window: bool) -> dict:
        """Bounds on every ReLU input: `fixed` ones as given, the rest (up to the last one not fixed) by the
        forward pass (with receptive-field windows if `window`)."""
        fixed = fixed or {}
        known = [fixed.get(name) for name in self.relu_inputs]
        missing = [r for r, name in enumerate(self.relu_inputs) if name not in fixed]
        assert self.forward is not None  # only called where use_forward said so
        computed = self.forward.relu_inputs(x_lo, x_hi, known, upto=missing[-1] + 1 if missing else 0,
                                            check=self.planner.limits.check, window=window)
        bounds = dict(fixed)
        for name, pair in zip(self.relu_inputs, computed):
            if name not in fixed:
                bounds[name] = pair
        return bounds

    def network_input(self, lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-option values of the bounded module's two channel groups (float64)."""
        if self.variant == "point":
            return lower.astype(np.float64), upper.astype(np.float64) - lower.astype(np.float64)
        return lower.astype(np.float64), upper.astype(np.float64)

    def bound(
        self, options: PixelOptions, samples: np.ndarray, first: np.ndarray, last: np.ndarray,
        labels: torch.Tensor, method: str | None = None,
        fixed: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        reference: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None, deadline: float | None = None,
        intermediate: str | None = None, window: bool | None = None,
    ) -> DomainBounds:
        """Bounds for n domains: domain i is sample `samples[i]` with option ranges first[i]..last[i] (n × P).

        `fixed`: bounds on ReLU inputs (batched like the domains) to use as they are instead of computing
        them — sound whenever each domain lies inside the domain they were computed for (a BaB parent).
        `reference`: such bounds used to tighten (and sparsify) freshly computed ones.
        `intermediate="backward"` makes this call find the ReLU-input bounds by CROWN whatever the bounder's mode
        (`DomainBounds.forward` says which way they were found); `window` overrides `window_on` for this call.
        Raises BoundTimeout past `deadline` and OutOfMemoryBudget past the planner's budget (at a layer boundary).
        """
        def call():
            return self.planner.call(lambda: self._bound(options, samples, first, last, labels, method, fixed,
                                                         reference, intermediate, window), len(samples), deadline)

        if self.batched or (method or self.method) == "ibp":
            return call()
        try:
            return call()
        except OutOfMemoryBudget:  # too big at once: the same bounds, a layer's unstable neurons a batch at a time
            self.bounded.bound_opts["crown_batch_size"] = FALLBACK_CROWN_BATCH
            self.batched = True
            try:
                return call()
            finally:
                if len(samples) > 1:  # a batch may fit smaller; one domain that did not fit never will: stay batched
                    self.bounded.bound_opts["crown_batch_size"] = np.inf
                    self.batched = False

    def optimized(self, options: PixelOptions, samples: np.ndarray, first: np.ndarray, last: np.ndarray,
                  labels: torch.Tensor, bounds: DomainBounds, iterations: int, deadline: float | None = None,
                  ) -> torch.Tensor:
        """`bounds.margins` of n domains raised by α-CROWN over their ReLU-input bounds (`alpha.optimized_margins`,
        at most `iterations` steps; the ReLU-input bounds stay as they are). The margins as they are where the
        network is not a chain or the bounds carry no ReLU-input bounds. Raises BoundTimeout past `deadline` and
        OutOfMemoryBudget past the planner's budget."""
        if self.forward is None or bounds.intermediate is None or iterations <= 0:
            return bounds.margins
        x_lo, x_hi, _ = self.box(options, samples, first, last)
        spec = margin_matrix(labels.to(self.device), self.num_classes)
        relu_bounds = [bounds.intermediate[name] for name in self.relu_inputs]
        forward = self.forward
        found = self.planner.call(lambda: optimized_margins(forward, x_lo, x_hi, relu_bounds, spec, iterations,
                                                            self.planner.limits.check), len(samples), deadline)
        return torch.maximum(bounds.margins, found.detach().cpu())

    def box(self, options: PixelOptions, samples: np.ndarray, first: np.ndarray, last: np.ndarray):
        """The bounded module's input box (x_lo, x_hi: n × 2C × H × W, on the engine's device) of n domains, and
        per domain and channel group the float64 widths of the box (for the branching score)."""
        n = len(samples)
        c, h, w = self.image_shape
        lower_s, upper_s = options.lower[samples], options.upper[samples]
        chan_a, chan_b = self.network_input(lower_s, upper_s)
        index = np.arange(lower_s.shape[2])[None, None, :]
        inside = (index >= first[:, :, None]) & (index <= last[:, :, None])
        boxes = []
        for values in (chan_a, chan_b):
            lo = round_down(np.where(inside, values, np.inf).min(axis=2))
            hi = round_up(np.where(inside, values, -np.inf).max(axis=2))
            boxes.append((lo, hi))
        x_lo = torch.from_numpy(np.concatenate([boxes[0][0], boxes[1][0]], axis=1)).view(n, 2 * c, h, w)
        x_hi = torch.from_numpy(np.concatenate([boxes[0][1], boxes[1][1]], axis=1)).view(n, 2 * c, h, w)
        widths = [(hi.astype(np.float64) - lo.astype(np.float64)) for lo, hi in boxes]
        return x_lo.to(self.device), x_hi.to(self.device), widths

    def root_box(self, options: PixelOptions) -> tuple[torch.Tensor, torch.Tensor]:
        """The input box of every sample's whole eps-ball (all options of every pixel): the exact hull's box."""
        n, pixels = options.count.shape
        samples = np.arange(n)
        first = np.zeros((n, pixels), dtype=np.int64)
        x_lo, x_hi, _ = self.box(options, samples, first, options.count - 1)
        return x_lo, x_hi

    def _bound(self, options, samples, first, last, labels, method, fixed, reference, intermediate,
               window) -> DomainBounds:
        method = method or self.method
        n = len(samples)
        x_lo, x_hi, widths = self.box(options, samples, first, last)
        inputs = (bounded_input(x_lo, x_hi),)
        spec = margin_matrix(labels.to(self.device), self.num_classes)
        need_a = method != "ibp"
        kwargs: dict = {}
        if need_a:
            kwargs = {"return_A": True,
                      "needed_A_dict": {self.bounded.output_name[0]: [self.bounded.input_name[0]]}}
        with torch.no_grad() if method != "alpha-crown" else nullcontext():
            # a BaB refresh (reference bounds from the parent) stays with CROWN: with the reference it bounds only
            # the unstable neurons, so it is cheap, and it is what tightens a child's bounds beyond its parent's
            # (a windows refresh, `windows_refresh`: CROWN of the parent's unstable neurons, `ForwardBounds.refreshed`)
            refreshed = None
            if need_a and reference and self.forward is not None and self.windows_refresh() \
                    and set(self.relu_inputs) <= set(reference):
                refreshed = self.forward.refreshed(x_lo, x_hi, [reference[name] for name in self.relu_inputs],
                                                   self.planner.limits.check)
            if need_a and reference and self.second is not None:  # refresh 'second-conv'
                early = self.relu_inputs[:2]
                computed = self.second.bounds(x_lo, x_hi, [reference.get(name) for name in early],
                                              self.planner.limits.check)
                fixed = {**(fixed or {}), **dict(zip(early, computed))}
                reference = {name: pair for name, pair in reference.items() if name not in fixed} or None
            if refreshed is not None:
                kwargs["intermediate_layer_bounds"] = dict(zip(self.relu_inputs, refreshed))
                reference = fixed = None
                method = "crown" if method == CROWN_LAST else method
            forward = need_a and refreshed is None and intermediate != "backward" and not reference \
                and self.use_forward(x_lo, x_hi)
            if forward:
                kwargs["intermediate_layer_bounds"] = self._forward_intermediate(
                    x_lo, x_hi, fixed, self.window_on if window is None else window)
                fixed = None
                method = "crown" if method == CROWN_LAST else method
            if method == CROWN_LAST:
                kwargs["intermediate_layer_bounds"] = self._ibp_intermediate(inputs)
                method = "crown"
            if fixed:
                kwargs["intermediate_layer_bounds"] = fixed
            if reference:
                kwargs["reference_bounds"] = reference
                kwargs["aux_reference_bounds"] = reference
            given = kwargs.get("intermediate_layer_bounds", {})
            if need_a and self.batched and not set(self.relu_inputs) <= set(given):
                # auto_LiRPA's batched CROWN cannot return A: intermediate bounds first, then the margins and
                # their A from those bounds (one more backward pass from the output only)
                pass_kwargs = {k: v for k, v in kwargs.items() if k not in ("return_A", "needed_A_dict")}
                self.bounded.compute_bounds(x=inputs, C=spec, method=LIRPA_METHODS[method], bound_upper=False,
                                            **pass_kwargs)
                kwargs["intermediate_layer_bounds"] = {
                    name: (self.bounded[name].lower.detach(), self.bounded[name].upper.detach())
                    for name in self.relu_inputs}
            out = self.bounded.compute_bounds(
                x=inputs, C=spec, method=LIRPA_METHODS[method], bound_upper=False, **kwargs
            )
        margins = out[0].detach().cpu()
        intermediate_bounds: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        if method != "ibp":
            intermediate_bounds = {}
            for name in self.relu_inputs:
                node = self.bounded[name]
                if getattr(node, "lower", None) is None or getattr(node, "upper", None) is None:
                    intermediate_bounds = None
                    break
                intermediate_bounds[name] = (node.lower.detach(), node.upper.detach())
        if not need_a:
            return DomainBounds(margins, widths[0] + widths[1], None, None, None)
        a_matrix = out[2][self.bounded.output_name[0]][self.bounded.input_name[0]]["lA"].detach().cpu()
        worst = margins.argmin(dim=1)
        a_worst = a_matrix[torch.arange(n), worst].reshape(n, 2, -1).numpy().astype(np.float64)
        score = np.abs(a_worst[:, 0]) * widths[0] + np.abs(a_worst[:, 1]) * widths[1]
        if self.variant == "point":  # chain rule back to the abstract ends: [lower, gap] = [L, U - L]
            coeff_lower, coeff_upper = a_worst[:, 0] - a_worst[:, 1], a_worst[:, 1]
        else:
            coeff_lower, coeff_upper = a_worst[:, 0], a_worst[:, 1]
        return DomainBounds(margins, score, coeff_lower, coeff_upper, intermediate_bounds, forward)
