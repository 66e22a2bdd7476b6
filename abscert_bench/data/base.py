"""The Dataset record, its validation, the dataset registry and root resolution."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..registry import Registry

#: Environment variable naming the data root when no explicit root is given.
DATA_ENV = "ABSCERT_DATA"
#: Data root used when neither an argument nor ABSCERT_DATA is given (relative to the cwd).
DEFAULT_ROOT = Path("data")

PathLike = str | Path
Loader = Callable[[Path], "Dataset"]


@dataclass(frozen=True)
class Dataset:
    """A train/test split of images: x is float32 N×C×H×W in raw [0,1], y is int64 class ids."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The per-image shape (C, H, W)."""
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def channels(self) -> int:
        """Number of image channels C."""
        return self.input_shape[0]


DATASETS: Registry[Loader] = Registry("dataset")


def _check_split(name: str, split: str, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
    """Raise UserError unless (x, y) is a well-formed split with pixel values in [0,1]."""
    if x.dim() != 4:
        raise UserError(f"dataset {name!r}: {split} images must be N×C×H×W, got shape {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise UserError(
            f"dataset {name!r}: {split} has {x.shape[0]} images but labels of shape {tuple(y.shape)}"
        )
    if x.dtype != torch.float32 or y.dtype != torch.int64:
        raise UserError(f"dataset {name!r}: {split} must be float32 images and int64 labels")
    if x.numel():
        if torch.isnan(x).any():
            raise UserError(f"dataset {name!r}: {split} images contain NaN values")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise UserError(
                f"dataset {name!r}: {split} pixel values must lie in [0,1], found [{lo:g}, {hi:g}]"
            )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise UserError(f"dataset {name!r}: {split} labels must lie in 0..{num_classes - 1}")


def validate_dataset(ds: Dataset) -> Dataset:
    """Return `ds` unchanged, or raise UserError (naming it) on NaN/out-of-[0,1] pixels or bad shapes."""
    _check_split(ds.name, "train", ds.train_x, ds.train_y, ds.num_classes)
    _check_split(ds.name, "test", ds.test_x, ds.test_y, ds.num_classes)
    if ds.train_x.shape[1:] != ds.test_x.shape[1:]:
        raise UserError(
            f"dataset {ds.name!r}: train image shape {tuple(ds.train_x.shape[1:])} "
            f"differs from test image shape {tuple(ds.test_x.shape[1:])}"
        )
    return ds


def resolve_root(root: PathLike | None = None) -> Path:
    """The data root: `root` if given, else $ABSCERT_DATA if set, else ./data."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get(DATA_ENV, "")
    if env:
        return Path(env).expanduser()
    return DEFAULT_ROOT


def dataset_names() -> list[str]:
    """Names of all registered datasets, sorted."""
    return DATASETS.names()


def load_dataset(name: str, root: PathLike | None = None) -> Dataset:
    """Load registered dataset `name` from the resolved data root and validate it."""
    loader = DATASETS.get(name)
    return validate_dataset(loader(resolve_root(root)))
