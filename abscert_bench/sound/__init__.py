"""Building blocks of the `abscert-sound` verifier (registered in abscert_bench/verification/sound.py).

choices  – the reachable abstract inputs of an eps-ball, per pixel a short list of options
attack   – discrete gradient-guided attack over the choice pixels
bounds   – auto_LiRPA margin bounds over the hull of a domain (exact gap form for the point variant)
search   – exact enumeration and branch and bound
recheck  – independent counterexample re-check and the counterexample .npz format
"""
from .choices import PixelOptions, reachable_options, widened_ball
from .recheck import load_counterexamples, recheck_counterexample, recheck_file, save_counterexamples

__all__ = [
    "PixelOptions",
    "load_counterexamples",
    "reachable_options",
    "recheck_counterexample",
    "recheck_file",
    "save_counterexamples",
    "widened_ball",
]
