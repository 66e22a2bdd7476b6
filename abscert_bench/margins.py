"""The robustness specification as linear rows over the logits (torch-free: the VNN-LIB writer uses it too)."""
from __future__ import annotations

import numpy as np


def margin_rows(label: int, num_classes: int) -> np.ndarray:
    """Rows e_label - e_j for every j != label ((K-1) × K): row · logits is the margin of label over class j.

    The property "classified as `label`" holds exactly when every row's value is positive; its violation (what
    VNN-LIB files state) is the disjunction over rows of row · logits <= 0.
    """
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} outside 0..{num_classes - 1}")
    others = [j for j in range(num_classes) if j != label]
    rows = np.zeros((num_classes - 1, num_classes))
    rows[:, label] = 1.0
    rows[np.arange(num_classes - 1), others] = -1.0
    return rows
