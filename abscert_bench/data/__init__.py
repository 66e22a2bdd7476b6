"""Datasets: a registry of loaders returning train/test tensors in raw [0,1] pixel space."""
from __future__ import annotations

from . import cifar, digits, idx  # noqa: F401  (registers the loaders)
from .base import DATA_ENV, DATASETS, Dataset, dataset_names, load_dataset, resolve_root, validate_dataset
from .cifar import load_cifar10, read_cifar_batch
from .digits import load_digits_dataset
from .idx import IDX_FILES, load_fashion_mnist, load_idx_dataset, load_mnist, read_idx, write_idx
from .prepare import mnist_split, prepare

__all__ = [
    "DATA_ENV",
    "DATASETS",
    "Dataset",
    "IDX_FILES",
    "dataset_names",
    "load_cifar10",
    "load_dataset",
    "load_digits_dataset",
    "load_fashion_mnist",
    "load_idx_dataset",
    "load_mnist",
    "mnist_split",
    "prepare",
    "read_cifar_batch",
    "read_idx",
    "resolve_root",
    "validate_dataset",
    "write_idx",
]
