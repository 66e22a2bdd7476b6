"""auto_LiRPA-backed baselines: IBP / CROWN-IBP training and IBP / CROWN / alpha-CROWN verification.

The import name is `abscert_bench_baselines` (the folder `baselines/` of the repository holds it), so it cannot
collide with the unrelated PyPI distribution `baselines`. Its methods and verifiers register into
`abscert_bench.training.METHODS` and `abscert_bench.verification.VERIFIERS` when those packages are imported.
"""
