"""Building blocks of the `abscert-sound` verifier (see abscert_bench/verify/sound.py)."""
