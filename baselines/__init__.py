"""auto_LiRPA-backed baselines: IBP / CROWN-IBP training and IBP / CROWN / alpha-CROWN verification."""
from . import bounds, training, verifiers  # noqa: F401  (register into abscert_bench's registries)
