"""IDX file reader/writer and the MNIST / Fashion-MNIST loaders built on it.

IDX layout: magic ``00 00 <dtype> <ndim>``, then ``ndim`` big-endian uint32 dims, then the
data in C order (big-endian for multi-byte types). Files ending in ``.gz`` are gzip-compressed.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .base import DATASETS, Dataset, PathLike

#: IDX dtype code → numpy dtype (big-endian where it matters).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: Standard IDX file names, in (train images, train labels, test images, test labels) order.
IDX_FILES: tuple[str, str, str, str] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _read_bytes(path: Path) -> bytes:
    """The (decompressed, for .gz) contents of `path`, or a UserError naming it."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"IDX file not found: {path}") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"cannot read IDX file {path}: {exc}") from None


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into a native-endian numpy array; UserError (naming `source`) if malformed."""
    if len(data) < 4:
        raise UserError(f"IDX file {source} is truncated: {len(data)} bytes, no header")
    if data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise UserError(
            f"IDX file {source} has wrong magic bytes {data[:4].hex()} (expected 0000<dtype><ndim>)"
        )
    dtype, ndim = IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"IDX file {source} is truncated inside its header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual < expected:
        raise UserError(
            f"IDX file {source} is truncated: dims {dims} need {expected} data bytes, found {actual}"
        )
    if actual > expected:
        raise UserError(
            f"IDX file {source} has {actual - expected} unexpected trailing bytes after dims {dims}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header, count=expected // dtype.itemsize)
    return arr.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (raw or .gz) into a numpy array; malformed files raise UserError naming it."""
    p = Path(path)
    return parse_idx(_read_bytes(p), str(p))


def encode_idx(array: np.ndarray) -> bytes:
    """Encode `array` as IDX bytes (dtype must be one of the IDX types, ndim 1..255)."""
    arr = np.asarray(array)
    for code, dt in IDX_DTYPES.items():  # noqa: B007  (code and dt are used after the loop's break)
        if arr.dtype.kind == dt.kind and arr.dtype.itemsize == dt.itemsize:
            break
    else:
        raise ValueError(f"dtype {arr.dtype} has no IDX encoding")
    if not 1 <= arr.ndim <= 255:
        raise ValueError(f"IDX needs 1..255 dimensions, got {arr.ndim}")
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(arr, dtype=dt).tobytes()


def write_idx(path: PathLike, array: np.ndarray) -> Path:
    """Write `array` as an IDX file (gzip-compressed if the name ends in .gz), atomically."""
    p = Path(path)
    data = encode_idx(array)
    tmp = p.with_name(p.name + ".tmp")
    try:
        if p.name.endswith(".gz"):
            with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as fh:
                fh.write(data)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def find_idx_file(directory: Path, name: str) -> Path | None:
    """`directory/name` if present, else `directory/name.gz` if present, else None."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _to_tensors(images: np.ndarray, labels: np.ndarray, name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Check an (images, labels) IDX pair and convert to (float32 N×1×H×W /255, int64)."""
    if images.dtype != np.uint8 or images.ndim != 3:
        raise UserError(f"{name} {split} images must be a uint8 N×H×W IDX array, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserError(f"{name} {split}: {len(images)} images but label array of shape {labels.shape}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def load_idx_dataset(name: str, root: Path, subdir: str | None = None, num_classes: int = 10) -> Dataset:
    """Load a 4-file MNIST-style IDX dataset from `root/subdir` (subdir defaults to `name`)."""
    directory = Path(root) / (subdir or name)
    found = {f: find_idx_file(directory, f) for f in IDX_FILES}
    missing = [f for f, p in found.items() if p is None]
    if missing:
        raise UserError(
            f"{name} data not found: missing {', '.join(f + '[.gz]' for f in missing)} "
            f"in {directory}; run: abscert-bench data prepare --data-root {root}"
        )
    arrays = [read_idx(found[f]) for f in IDX_FILES]  # type: ignore[arg-type]
    train_x, train_y = _to_tensors(arrays[0], arrays[1], name, "train")
    test_x, test_y = _to_tensors(arrays[2], arrays[3], name, "test")
    return Dataset(name, train_x, train_y, test_x, test_y, num_classes)


@DATASETS.register("mnist")
def load_mnist(root: Path) -> Dataset:
    """MNIST from `<root>/mnist/` (standard IDX names, raw or .gz)."""
    return load_idx_dataset("mnist", root)


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(root: Path) -> Dataset:
    """Fashion-MNIST from `<root>/fashion-mnist/` (standard IDX names, raw or .gz)."""
    return load_idx_dataset("fashion-mnist", root)
