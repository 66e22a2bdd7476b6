"""Speed benchmark: per-epoch training time of each method relative to natural training, in one run."""
from __future__ import annotations

import statistics

from .data import load_dataset
from .training.loop import TrainConfig, train_model
from .training.methods import create_method

# label → (training method, options). `crown-ibp` is the bound computation alone (loss fusion, its default, without
# the warm-up regularisers); `crown-ibp+reg` adds the Shi et al. regularisers as the recipe runs them during the
# ramp (they fade to 0 when the ramp ends); `crown-ibp-unfused` bounds the K-1 margins instead.
BENCH_METHODS: dict[str, tuple[str, dict]] = {
    "natural": ("natural", {}),
    "abscert": ("abscert", {"d": 0.2}),
    "ibp": ("ibp", {}),
    "crown-ibp": ("crown-ibp", {"reg_weight": 0.0}),
    "crown-ibp+reg": ("crown-ibp", {}),
    "crown-ibp-unfused": ("crown-ibp", {"loss_fusion": False, "reg_weight": 0.0}),
}
TARGET_ABSCERT_RATIO = 1.02  # on every repeat (the paired, interleaved epochs), not only the median
TARGET_CROWN_IBP_RATIO = 6.0  # CROWN-IBP with loss fusion against natural training


def speed_benchmark(
    dataset_name: str = "digits", model: str = "dm_small", eps: float = 0.1, epochs: int = 3,
    batch_size: int = 128, device: str = "cpu", data_root: str | None = None, limit_train: int | None = None,
    methods: list[str] | None = None,
) -> str:
    """Train every method on the same model/data for one epoch per repeat; report median times and ratios.

    Each measured epoch is a ramp epoch (eps rises 0 → eps across it; kappa and CROWN-IBP's beta move with it),
    so CROWN-IBP pays for both of its bounds as it does during its ramp phase; the cost of IBP does not depend
    on the value of eps. Methods are interleaved (natural, abscert, ibp, crown-ibp, repeated `epochs` times)
    so that machine-load drift affects all of them alike. `methods`: labels of BENCH_METHODS to run (natural is
    always included); `crown-ibp` is CROWN-IBP with loss fusion (its default), `crown-ibp-unfused` the K-1 margins.
    """
    from .errors import UserError

    chosen = list(BENCH_METHODS) if not methods else ["natural"] + [m for m in methods if m != "natural"]
    unknown = [m for m in chosen if m not in BENCH_METHODS]
    if unknown:
        raise UserError(f"unknown bench methods {', '.join(unknown)}; valid: {', '.join(BENCH_METHODS)}")
    dataset = load_dataset(dataset_name, data_root)
    n = len(dataset.train_x) if limit_train is None else min(limit_train, len(dataset.train_x))
    x, y = dataset.train_x[:n], dataset.train_y[:n]
    times: dict[str, list[float]] = {m: [] for m in chosen}
    for repeat in range(epochs):
        for label in chosen:
            name, options = BENCH_METHODS[label]
            config = TrainConfig(dataset_name, model, name, eps, epochs=1, batch_size=batch_size, seed=repeat,
                                 warmup_epochs=0, ramp_epochs=1, method_options=options, device=device)
            _, metrics = train_model(config, create_method(name, eps, **options), x, y,
                                     dataset.test_x[:1], dataset.test_y[:1], dataset.num_classes)
            times[label].append(metrics[0]["train_time_s"])
    median = {m: statistics.median(t) for m, t in times.items()}
    lines = [f"speed benchmark: {dataset_name} ({n} training images), {model}, eps={eps:g}, batch {batch_size}, "
             f"device {device}, median of {epochs} one-epoch runs per method (interleaved; each a ramp epoch)",
             "| method | s/epoch | ratio to natural |", "|---|---|---|"]
    for name, seconds in median.items():
        lines.append(f"| {name} | {seconds:.3f} | {seconds / median['natural']:.3f} |")
    for label, target in (("abscert", TARGET_ABSCERT_RATIO), ("crown-ibp", TARGET_CROWN_IBP_RATIO)):
        if label in median:
            ratio = median[label] / median["natural"]
            paired = [t / base for t, base in zip(times[label], times["natural"])]
            verdict = "meets" if max(paired) <= target else "misses"
            lines.append(f"{label}/natural = {ratio:.3f} median; per repeat "
                         f"{', '.join(f'{r:.3f}' for r in paired)} "
                         f"({verdict} the target <= {target:g} on every repeat)")
    return "\n".join(lines) + "\n"
