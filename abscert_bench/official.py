"""AbsCert as published: units, cell count, granularity candidates and training recipe of the official code.

Torch-free. Everything here restates what `github:zhangzhaodi233/ABSCERT`, folder `TrainRobustNN/`, does
(read, not copied):

* `utils/datasets.py` `load_dataset`: images go through `ToTensor()` then `Normalize(0.5, 0.5)`, so the
  abstraction works on [-1, 1], not on raw [0, 1] pixels. The paper's eps and d are in those units: a paper
  eps is **twice** a pixel eps (paper 0.1 = pixel 0.05).
* `utils/mapping_func.py` `abstract_data`: `interval_num` cells of width `2 / interval_num` on [-1, 1],
  `k = floor((x + 1) / step)`, the value 1 moved down into the last cell; N gets [upper, lower] of the cell.
* `main.py` `main`: `interval_num = 2 // d` (Python float floor: `2 // 0.2 == 9.0`, so the candidate d = 0.2
  gives 9 cells of width 2/9 ≈ 0.222 — the README's η 0.222 and 0.285 are 2/9 and 2/7).
* `main.py` `generate_d`: the candidate list, d = 2/i for i = 2, 3, … while d >= 2·eps (d_step apart), plus
  the threshold 2 / int(1/eps) for each eps.
* `main.py` `main` + `train/train.py` `train`: one model per candidate, the epoch with the best *test*
  accuracy of N on the abstraction of the clean test image (`verify/verify.py` `verify`) is kept, and the d
  with the best such accuracy is reported. Both choices are made on the test set.

Our one cell rule (`abstraction.cell_index`) on raw pixels with granularity exactly 1/K gives the official
cells of K = `2 // d` cells on [-1, 1] (in exact arithmetic; `tests/test_official.py` checks all 256 8-bit levels
and documents where the official float32 pipeline puts an exact edge into the lower cell instead).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from .errors import UserError

PROTOCOLS = ("pixel", "official", "clean")
SELECTION = {"official": "test", "clean": "validation"}  # where epoch and d are chosen
RECIPES_CHOICES = ("official", "given")  # `recipe` option: the table below, or the run's own [train] settings
DEFAULT_D_STEP = 0.01  # config/default.json "d_step"
NORMALIZE_MEAN, NORMALIZE_STD = 0.5, 0.5  # Normalize((0.5,), (0.5,)): [0,1] -> [-1,1], on all 2C channels
VALIDATION_FRACTION = 0.1  # the clean protocol's held-out share of the training split


# -- units ------------------------------------------------------------------------------------------------------------
def paper_eps(pixel_eps: float) -> float:
    """The paper's eps (on [-1, 1]) for a raw-pixel radius: twice it."""
    return 2.0 * float(pixel_eps)


def pixel_eps(paper_eps_value: float) -> float:
    """The raw-pixel radius of a paper eps: half of it."""
    return float(paper_eps_value) / 2.0


def official_cell_count(paper_d: float) -> int:
    """`interval_num = 2 // d` of main.py: Python's float floor division (2 // 0.2 == 9)."""
    paper_d = float(paper_d)
    if not (math.isfinite(paper_d) and 0 < paper_d <= 2):
        raise UserError(f"a paper granularity d must be in (0, 2], got {paper_d}")
    return int(2.0 // paper_d)


def pixel_granularity(paper_d: float) -> float:
    """Our raw-pixel granularity for a paper d: exactly 1/K with K the official cell count."""
    return 1.0 / official_cell_count(paper_d)


def official_cell_exact(level: int, cells: int, levels: int = 255) -> int:
    """The official [-1, 1] rule for the 8-bit pixel `level`, in exact rational arithmetic (reference only).

    x = 2·level/levels − 1, step = 2/cells, k = floor((x + 1) / step); x = 1 gives k = cells, which
    `abstract_data` moves down into the last cell (its lower end would equal its upper end).
    """
    x = Fraction(2 * level, levels) - 1
    k = math.floor((x + 1) / Fraction(2, cells))
    return min(k, cells - 1)


def official_cell_bounds(level: int, cells: int, levels: int = 255) -> tuple[Fraction, Fraction]:
    """[lower, upper] of the official cell on [-1, 1] (exact)."""
    k = official_cell_exact(level, cells, levels)
    step = Fraction(2, cells)
    return -1 + k * step, min(Fraction(1), -1 + (k + 1) * step)


# -- candidates -------------------------------------------------------------------------------------------------------
def generate_d(paper_eps_list: list[float], d_step: float = DEFAULT_D_STEP) -> tuple[list[float], list[float]]:
    """The official candidate rule (main.py `generate_d`), restated: (d list, per-eps threshold d).

    Walks d = 2/i for i = 2 … 255 (largest first). A d at least `d_step` below the last kept one is kept.
    When d drops below 2·eps of the current (largest remaining) eps, that eps's threshold
    2 / int(1/eps) — the finest d = 2/m with m cells, m = int(1/eps), that still has 2/m >= 2·eps — is
    added (once) and the next eps is taken; the walk ends after the smallest eps.
    """
    values = sorted((float(e) for e in paper_eps_list), reverse=True)
    if not values or any(not (0 < e <= 1) for e in values):
        raise UserError(f"the official granularity rule needs paper eps in (0, 1], got {paper_eps_list}")
    if not (d_step >= 0 and math.isfinite(d_step)):
        raise UserError(f"d_step must be >= 0, got {d_step}")
    d_list: list[float] = []
    thresholds: list[float] = []
    last, e = 2.0, 0
    for i in range(2, 256):
        d = 2.0 / i
        if d < 2 * values[e]:
            threshold = 2 / int(1 / values[e])
            if threshold not in d_list:
                d_list.append(threshold)
            thresholds.append(threshold)
            e += 1
        if e >= len(values):
            break
        if last - d >= d_step:
            d_list.append(d)
            last = d
    return d_list, thresholds


@dataclass(frozen=True)
class Candidate:
    """One granularity the official protocol trains: the paper d(s) mapping to K cells, our pixel d = 1/K."""

    paper_d: tuple[float, ...]  # every official candidate d with this cell count (largest first)
    cells: int

    @property
    def pixel_d(self) -> float:
        return 1.0 / self.cells

    @property
    def cell_width_paper(self) -> float:
        """The real cell width on [-1, 1] (the paper's η), 2/K."""
        return 2.0 / self.cells


def official_candidates(pixel_eps_value: float, d_step: float = DEFAULT_D_STEP) -> list[Candidate]:
    """Candidates for a run at raw-pixel eps: generate_d at paper eps = 2·eps, grouped by cell count.

    Two official d can give the same K (2 // 0.4 == 2 // 0.5 == 4): they abstract every image the same
    way, so one model per distinct K is trained (the official code trains both, from the same seed here
    they would be identical). Order: coarsest first, as the official loop.
    """
    eps = float(pixel_eps_value)
    if not (0 < eps <= 0.5):
        raise UserError(f"the official/clean protocols need 0 < eps <= 0.5 (pixel units), got {eps}")
    d_list, _ = generate_d([paper_eps(eps)], d_step)
    groups: dict[int, list[float]] = {}
    for d in d_list:
        groups.setdefault(official_cell_count(d), []).append(d)
    out = [Candidate(tuple(ds), k) for k, ds in groups.items()]
    out.sort(key=lambda c: c.cells)
    for c in out:  # the rule's guarantee, in our units: every cell is at least 2·eps wide
        assert c.pixel_d >= 2 * eps - 1e-12, (c, eps)
    return out


def is_candidate_d(d: float, pixel_eps_value: float, d_step: float = DEFAULT_D_STEP) -> bool:
    """True when d is the pixel granularity 1/K of one of the official candidates at this eps."""
    return any(abs(c.pixel_d - float(d)) <= 1e-12 for c in official_candidates(pixel_eps_value, d_step))


# -- recipe -----------------------------------------------------------------------------------------------------------
#: The official training recipe (TrainRobustNN/config/*.json over config/default.json), one row per
#: (dataset family, model family). Every row: Adam with weight_decay 2e-4 (applied here as the equivalent
#: L2 term 1e-4·||θ||² in the loss, which is what Adam's coupled weight decay does to the gradient), cosine lr
#: schedule with linear warm-up over the first tenth of training (transformers'
#: get_cosine_schedule_with_warmup), xavier_uniform_ on every Linear/Conv2d weight. CIFAR rows add the
#: training augmentation of `load_dataset('cifar')`: random horizontal flip, random erasing (scale
#: 0.04–0.2, ratio 0.5–2) and a random 32×32 crop with padding 4 (both fills 0 on [-1, 1], pixel 0.5).
RECIPES: dict[tuple[str, str], dict[str, Any]] = {
    ("mnist", "fc"): {"lr": 0.01, "batch_size": 128, "epochs": 10, "source": "config/mnist_fc3.json, mnist_fc5.json"},
    ("mnist", "conv"): {"lr": 1e-3, "batch_size": 256, "epochs": 10,
                        "source": "config/mnist_dm_{small,medium,large}.json"},
    ("cifar", "fc3"): {"lr": 0.01, "batch_size": 128, "epochs": 30, "source": "config/cifar_fc3.json"},
    ("cifar", "fc5"): {"lr": 0.01, "batch_size": 128, "epochs": 10, "source": "config/cifar_fc5.json"},
    ("cifar", "conv"): {"lr": 3e-3, "batch_size": 128, "epochs": 30,
                        "source": "config/cifar_dm_{small,medium,large}.json"},
}
COMMON_RECIPE: dict[str, Any] = {"optimizer": "adam", "weight_decay": 2e-4, "lr_schedule": "cosine",
                                 "lr_cycles": 2.0, "warmup_fraction": 0.1, "init": "xavier"}


def recipe_for(dataset: str, model: str) -> dict[str, Any]:
    """The official recipe row for a dataset and model (MNIST's rows serve the grey-scale sets, digits included)."""
    family = "cifar" if dataset.startswith("cifar") else "mnist"
    if model in ("fc3", "fc5"):
        key = (family, "fc") if family == "mnist" else (family, model)
    else:
        key = (family, "conv")
    row = {**COMMON_RECIPE, **RECIPES[key], "augment": family == "cifar", "row": f"{key[0]}/{key[1]}"}
    row["lr_warmup_epochs"] = row["warmup_fraction"] * row["epochs"]
    return row


def given_recipe(epochs: int) -> dict[str, Any]:
    """`recipe = "given"`: the run's own [train] settings, plus the official weight decay and init (no augmentation)."""
    return {**COMMON_RECIPE, "augment": False, "row": "given", "lr_schedule": None, "epochs": epochs,
            "source": "the run's [train] settings / CLI flags"}


def check_protocol(protocol: str) -> str:
    """Validate a protocol name."""
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown abscert protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    return protocol


def format_eps(eps: float, protocol: str | None) -> str:
    """A table's eps cell: pixel units, with the paper's units beside them for the official/clean protocols."""
    if protocol in SELECTION:
        return f"{eps:g} (paper {paper_eps(eps):g})"
    return f"{eps:g}"


TEST_SELECTION_MARK = "†"
TEST_SELECTION_NOTE = ("† official AbsCert protocol: the epoch and the granularity d were selected on the test "
                       "set (as in the published code); its test numbers are optimistic. ε is in raw-pixel units, "
                       "the paper's units (images on [-1, 1]) in brackets.")
VALIDATION_NOTE = ("clean AbsCert protocol: the official units, cells and recipe, with the epoch and d selected on "
                   "a held-out validation split of the training set. ε is in raw-pixel units, the paper's in brackets.")


def mark_label(label: str, row: dict[str, Any]) -> str:
    """A table's method cell: the label, with the test-selection mark for official-protocol rows."""
    return label + TEST_SELECTION_MARK if row.get("selection") == "test" else label


def table_notes(rows: list[dict[str, Any]]) -> list[str]:
    """The footnotes the rows need (none for pixel-protocol rows)."""
    notes = []
    if any(r.get("selection") == "test" for r in rows):
        notes.append(TEST_SELECTION_NOTE)
    if any(r.get("selection") == "validation" for r in rows):
        notes.append(VALIDATION_NOTE)
    return notes
