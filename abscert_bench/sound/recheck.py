"""Independent re-check of counterexamples, and their .npz file format.

`recheck_counterexample` shares no code with the verifier: it checks the ball in float64 and runs the
deployed classifier f itself (abstraction included) on the float32 image.

File format (`save_counterexamples` / `recheck_file`): an .npz with arrays
`index` (n,) int64 sample ids, `x` (n, C, H, W) float32 clean images, `x_adv` (n, C, H, W) float32
counterexamples, `label` (n,) int64 true labels, `eps` (n,) float64 radii.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..devices import module_device
from ..errors import UserError
from ..trained import TrainedModel, load_checkpoint

BALL_TOLERANCE = 1e-7
NPZ_KEYS = ("index", "x", "x_adv", "label", "eps")


def recheck_counterexample(
    trained: TrainedModel, x: Any, y: int, eps: float, x_adv: Any
) -> tuple[bool, str]:
    """(ok, message): ok ⇔ |x'-x|∞ <= eps + 1e-7 (float64), x' ∈ [0,1], and f(x') != y."""
    clean = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    adv = np.asarray(x_adv.detach().cpu() if isinstance(x_adv, torch.Tensor) else x_adv, dtype=np.float32)
    if adv.shape != clean.shape:
        return False, f"shape {adv.shape} differs from the image's {clean.shape}"
    if tuple(adv.shape) != tuple(trained.input_shape):
        return False, f"shape {adv.shape} differs from the model's input shape {tuple(trained.input_shape)}"
    if not np.isfinite(adv).all():
        return False, "counterexample contains NaN or inf"
    distance = float(np.max(np.abs(adv.astype(np.float64) - clean.astype(np.float64)))) if adv.size else 0.0
    if distance > float(eps) + BALL_TOLERANCE:
        return False, f"outside the ball: |x'-x|∞ = {distance:.9g} > eps = {float(eps):g}"
    if adv.min() < 0.0 or adv.max() > 1.0:
        return False, f"outside [0,1]: range [{adv.min():g}, {adv.max():g}]"
    trained.network.eval()
    with torch.no_grad():
        classifier = trained.classifier()
        predicted = int(classifier(torch.from_numpy(adv)[None].to(module_device(classifier))).argmax(1))
    if predicted == int(y):
        return False, f"not a counterexample: f(x') = {predicted} = label"
    return True, f"f(x') = {predicted} != label {int(y)}; |x'-x|∞ = {distance:.6g} <= eps = {float(eps):g}"


def save_counterexamples(path: str | Path, results: Sequence[Any], x_by_index: Any, eps: float) -> int:
    """Write every falsified result's counterexample to an .npz (atomically); returns how many were written.

    `results` are SampleResult-like (index, label, status, counterexample); `x_by_index[index]` gives
    the clean image of a sample (a tensor/array indexed by sample id, or a dict).
    """
    path = Path(path)
    rows = [r for r in results if r.status == "falsified" and r.counterexample is not None]
    clean = [np.asarray(_as_numpy(x_by_index[r.index]), dtype=np.float32) for r in rows]
    adv = [np.asarray(r.counterexample, dtype=np.float32) for r in rows]
    if rows:
        image_shape = clean[0].shape
    else:
        image_shape = tuple(getattr(x_by_index, "shape", (0, 0, 0, 0))[1:]) or (0, 0, 0)
    arrays = {
        "index": np.asarray([r.index for r in rows], dtype=np.int64),
        "x": np.stack(clean) if rows else np.zeros((0, *image_shape), np.float32),
        "x_adv": np.stack(adv) if rows else np.zeros((0, *image_shape), np.float32),
        "label": np.asarray([r.label for r in rows], dtype=np.int64),
        "eps": np.full(len(rows), float(eps), dtype=np.float64),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        # numpy's stub types **kwds as if they could fill its `allow_pickle: bool` (MNIST images compress ~10x)
        np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)
    return len(rows)


def load_counterexamples(npz_path: str | Path) -> dict[str, np.ndarray]:
    """Read and validate a counterexample file; UserError on a missing, corrupt or inconsistent file."""
    npz_path = Path(npz_path)
    if not npz_path.exists():
        raise UserError(f"no counterexample file at {npz_path}")
    try:
        with np.load(npz_path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as exc:  # numpy raises several types for a damaged file
        raise UserError(f"corrupt counterexample file {npz_path}: {type(exc).__name__}") from None
    missing = [key for key in NPZ_KEYS if key not in arrays]
    if missing:
        raise UserError(f"{npz_path} lacks arrays {', '.join(missing)} (needs {', '.join(NPZ_KEYS)})")
    n = len(arrays["index"])
    eps = np.broadcast_to(np.asarray(arrays["eps"], dtype=np.float64), (n,)) if np.ndim(arrays["eps"]) == 0 \
        else np.asarray(arrays["eps"], dtype=np.float64)
    arrays["eps"] = eps
    for key in NPZ_KEYS:
        if len(arrays[key]) != n:
            raise UserError(f"{npz_path}: array {key!r} has {len(arrays[key])} rows, index has {n}")
    if arrays["x"].shape != arrays["x_adv"].shape:
        raise UserError(f"{npz_path}: x has shape {arrays['x'].shape}, x_adv {arrays['x_adv'].shape}")
    return arrays


def recheck_file(checkpoint_path: str | Path, npz_path: str | Path) -> list[dict[str, Any]]:
    """Re-check every counterexample of an .npz against a checkpoint: one {index, label, ok, message} each."""
    trained = load_checkpoint(checkpoint_path)
    arrays = load_counterexamples(npz_path)
    if len(arrays["index"]) and tuple(arrays["x"].shape[1:]) != tuple(trained.input_shape):
        raise UserError(
            f"{npz_path}: images of shape {tuple(arrays['x'].shape[1:])}, model expects {tuple(trained.input_shape)}"
        )
    report = []
    for i in range(len(arrays["index"])):
        ok, message = recheck_counterexample(
            trained, arrays["x"][i], int(arrays["label"][i]), float(arrays["eps"][i]), arrays["x_adv"][i]
        )
        report.append({"index": int(arrays["index"][i]), "label": int(arrays["label"][i]), "ok": ok,
                       "message": message})
    return report


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)

