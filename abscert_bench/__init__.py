"""abscert-bench: AbsCert vs auto_LiRPA certified-training baselines, one harness."""

__version__ = "0.1.0"
