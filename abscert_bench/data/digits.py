"""scikit-learn's bundled 8×8 handwritten digits (no download, no root needed).

Split (fixed): ``sklearn.model_selection.train_test_split(test_size=360, stratify=y,
random_state=0)`` over the 1,797 images, giving 1,437 train / 360 test (80/20, stratified).
Pixel values 0..16 are divided by 16.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import DATASETS, Dataset

DIGITS_TEST_SIZE = 360
DIGITS_SEED = 0


@DATASETS.register("digits")
def load_digits_dataset(root: Path | None = None) -> Dataset:
    """sklearn's 8×8 digits as N×1×8×8 in [0,1], fixed stratified seed-0 split 1,437/360."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=DIGITS_TEST_SIZE, stratify=y, random_state=DIGITS_SEED
    )
    return Dataset(
        name="digits",
        train_x=torch.from_numpy(np.ascontiguousarray(x[idx_train])),
        train_y=torch.from_numpy(y[idx_train]),
        test_x=torch.from_numpy(np.ascontiguousarray(x[idx_test])),
        test_y=torch.from_numpy(y[idx_test]),
        num_classes=10,
    )
