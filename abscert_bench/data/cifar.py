"""CIFAR-10 from the standard python pickle batches (or the archive that contains them).

Expected at ``<root>/cifar10/cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``);
if absent, ``<root>/cifar10/cifar-10-python.tar.gz`` is extracted there on first load.
Batches are unpickled with a restricted unpickler that only admits numpy arrays.
"""
from __future__ import annotations

import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .base import DATASETS, Dataset

CIFAR_DIR = "cifar10"
CIFAR_BATCH_DIR = "cifar-10-batches-py"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR batch (dict of numpy arrays) needs."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve whitelisted globals (numpy.core → numpy._core); refuse everything else."""
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file → (uint8 N×3×32×32 images, int64 labels); UserError naming it if bad."""
    try:
        with open(path, "rb") as fh:
            batch = _BatchUnpickler(fh, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except FileNotFoundError:
        raise UserError(f"CIFAR-10 batch not found: {path}") from None
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"cannot read CIFAR-10 batch {path}: {type(exc).__name__}: {exc}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise UserError(
            f"CIFAR-10 batch {path} has data shape {data.shape} and {labels.size} labels "
            "(expected N×3072 and N labels)"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _extract_archive(archive: Path, dest: Path) -> None:
    """Extract the CIFAR-10 tarball into `dest` (refusing unsafe member paths)."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                for m in tar.getmembers():
                    if m.name.startswith("/") or ".." in Path(m.name).parts:
                        raise UserError(f"unsafe path {m.name!r} in {archive}")
                tar.extractall(dest)
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise UserError(f"cannot extract CIFAR-10 archive {archive}: {exc}") from None


def _batch_dir(root: Path) -> Path:
    """The directory holding the batches, extracting the archive first if that is all there is."""
    base = Path(root) / CIFAR_DIR
    batches = base / CIFAR_BATCH_DIR
    names = (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH)
    if all((batches / n).is_file() for n in names):
        return batches
    archive = base / CIFAR_ARCHIVE
    if archive.is_file():
        _extract_archive(archive, base)
        if all((batches / n).is_file() for n in names):
            return batches
        raise UserError(f"CIFAR-10 archive {archive} did not contain {CIFAR_BATCH_DIR}/ with {', '.join(names)}")
    raise UserError(
        f"cifar10 data not found: place the standard archive {CIFAR_ARCHIVE} ({CIFAR_URL}) "
        f"in {base}/ or its extracted {CIFAR_BATCH_DIR}/ directory (data_batch_1..5, test_batch) there"
    )


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and labels → (float32 /255, int64) tensors."""
    return torch.from_numpy(images.astype(np.float32) / 255.0), torch.from_numpy(labels)


@DATASETS.register("cifar10")
def load_cifar10(root: Path) -> Dataset:
    """CIFAR-10 from `<root>/cifar10/` as N×3×32×32 in [0,1] (standard 50,000/10,000 split)."""
    batches = _batch_dir(root)
    train = [read_cifar_batch(batches / n) for n in CIFAR_TRAIN_BATCHES]
    test_x, test_y = _to_tensors(*read_cifar_batch(batches / CIFAR_TEST_BATCH))
    train_x, train_y = _to_tensors(
        np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])
    )
    return Dataset("cifar10", train_x, train_y, test_x, test_y, num_classes=10)
