"""ONNX export of the networks a benchmark folder holds, and the checks that the export computes the same thing.

Three networks can be exported for one run:
- the standard network as trained (raw images in);
- the *hull* network for AbsCert models: lower-end channels in (`PointHullNetwork`) for 'point', the
  2C-channel network N itself for 'region';
- the *deployed* AbsCert classifier f = N(phi(x)), with the cell rule written out op by op exactly as
  `abstraction.cell_index` computes it: Cast to double, Div by d, Add 2^-16, Floor, Max 0 / Min K-1, Mul d,
  Min 1 (upper ends), Cast back to float.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..abstraction import EDGE_TOLERANCE, Abstraction, num_cells
from ..errors import UserError
from ..models.hull import PointHullNetwork

OPSET = 13
INPUT_NAME = "input"
OUTPUT_NAME = "output"
# onnxruntime and torch agree when |ort - torch| <= ATOL + RTOL·|torch| elementwise.
ATOL = 1e-5
RTOL = 1e-5


class ExportableCellRule(nn.Module):
    """`abstraction.cell_index` / `cell_lower` / `cell_upper` in ops that export one-to-one to ONNX."""

    d: torch.Tensor  # buffers (register_buffer), declared for the type checker
    tolerance: torch.Tensor
    first: torch.Tensor
    last: torch.Tensor
    one: torch.Tensor

    def __init__(self, d: float) -> None:
        super().__init__()
        f64 = torch.float64
        self.register_buffer("d", torch.tensor(float(d), dtype=f64))
        self.register_buffer("tolerance", torch.tensor(EDGE_TOLERANCE, dtype=f64))
        self.register_buffer("first", torch.tensor(0.0, dtype=f64))
        self.register_buffer("last", torch.tensor(float(num_cells(d) - 1), dtype=f64))
        self.register_buffer("one", torch.tensor(1.0, dtype=f64))

    def index(self, x: torch.Tensor) -> torch.Tensor:
        """Cell index as an integral float64 tensor: min(max(floor(x/d + 2^-16), 0), K-1)."""
        scaled = x.to(torch.float64) / self.d + self.tolerance
        return torch.minimum(torch.maximum(torch.floor(scaled), self.first), self.last)

    def lower(self, index: torch.Tensor) -> torch.Tensor:
        """k·d as float32."""
        return (index * self.d).to(torch.float32)

    def upper(self, index: torch.Tensor) -> torch.Tensor:
        """min((k+1)·d, 1) as float32."""
        return torch.minimum((index + self.one) * self.d, self.one).to(torch.float32)


class ExportableDeployed(nn.Module):
    """The deployed classifier f(x) = N(abstraction(x)) for raw images, written for ONNX export."""

    eps: torch.Tensor  # buffers (register_buffer), declared for the type checker
    zero32: torch.Tensor
    one32: torch.Tensor

    def __init__(self, abstraction: Abstraction, network: nn.Module) -> None:
        super().__init__()
        self.variant = abstraction.variant
        self.cells = ExportableCellRule(abstraction.d)
        self.network = network
        self.register_buffer("eps", torch.tensor(float(abstraction.eps), dtype=torch.float32))
        self.register_buffer("zero32", torch.tensor(0.0, dtype=torch.float32))
        self.register_buffer("one32", torch.tensor(1.0, dtype=torch.float32))

    def abstract(self, x: torch.Tensor) -> torch.Tensor:
        """2C-channel abstract input (same values as `Abstraction.__call__`)."""
        if self.variant == "point":
            k = self.cells.index(x)
            return torch.cat([self.cells.lower(k), self.cells.upper(k)], dim=1)
        low = torch.minimum(torch.maximum(x - self.eps, self.zero32), self.one32)
        high = torch.minimum(torch.maximum(x + self.eps, self.zero32), self.one32)
        return torch.cat([self.cells.lower(self.cells.index(low)), self.cells.upper(self.cells.index(high))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.abstract(x))


def export_form(network: nn.Module) -> nn.Module:
    """N as exported: a leading fixed Normalize (x - mean) / std becomes the same map as a 1×1 Conv (weight
    1/std, bias -mean/std), which every reader of the folder (our loader, auto_LiRPA, other tools) handles;
    auto_LiRPA 0.3 cannot bound a per-channel Sub/Div in front of a padded convolution. For the official
    protocol's mean = std = 0.5 both compute round(2x - 1): bit for bit the same function."""
    from ..models.registry import Normalize

    if not (isinstance(network, nn.Sequential) and len(network) > 1 and isinstance(network[0], Normalize)):
        return network
    norm = network[0]
    mean, std = norm.mean.reshape(-1), norm.std.reshape(-1)
    channels = mean.numel()
    conv = nn.Conv2d(channels, channels, 1)
    assert conv.bias is not None  # bias=True
    with torch.no_grad():
        conv.weight.copy_(torch.diag(1.0 / std).view(channels, channels, 1, 1))
        conv.bias.copy_(-mean / std)
    return nn.Sequential(conv, *list(network)[1:]).eval()


def hull_network(abstraction: Abstraction, network: nn.Module) -> nn.Module:
    """The network over the hull box: PointHullNetwork (lower ends in) for 'point', N itself for 'region'."""
    if abstraction.variant == "point":
        return PointHullNetwork(network, abstraction.d).eval()
    return network


def export_onnx(module: nn.Module, input_shape: tuple[int, ...], path: Path) -> None:
    """torch.onnx.export (TorchScript exporter, opset 13) with the batch dimension fixed to 1."""
    module.eval()
    dummy = torch.zeros((1, *input_shape), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (dummy,), str(path), dynamo=False, opset_version=OPSET, do_constant_folding=True,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        )


def onnxruntime_outputs(path: Path, inputs: np.ndarray) -> np.ndarray:
    """Run an exported model on each input (batch of 1 at a time) with onnxruntime."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: inputs[i:i + 1].astype(np.float32)})[0]
                           for i in range(len(inputs))])


def torch_outputs(module: nn.Module, inputs: np.ndarray) -> np.ndarray:
    """Run a torch module on each input (batch of 1, as the ONNX graph)."""
    with torch.no_grad():
        return np.concatenate([module(torch.from_numpy(inputs[i:i + 1].astype(np.float32))).numpy()
                               for i in range(len(inputs))])


def max_mismatch(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest |actual - expected| / (ATOL + RTOL·|expected|); <= 1 means they agree."""
    return float(np.max(np.abs(actual - expected) / (ATOL + RTOL * np.abs(expected))))


def check_export(path: Path, module: nn.Module, inputs: np.ndarray) -> dict[str, float]:
    """onnx.checker, then onnxruntime and our own loader against torch on `inputs`; UserError on a mismatch."""
    import onnx

    from .onnx_loader import load_onnx

    try:
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    except Exception as exc:
        raise UserError(f"exported {path} fails onnx.checker: {str(exc).splitlines()[0][:200]}") from None
    expected = torch_outputs(module, inputs)
    runtime = onnxruntime_outputs(path, inputs)
    ort_error = max_mismatch(runtime, expected)
    if not ort_error <= 1.0:
        raise UserError(f"exported {path}: onnxruntime differs from torch by more than {ATOL:g} (+{RTOL:g}·|y|)")
    loader_error = max_mismatch(torch_outputs(load_onnx(path), inputs), expected)
    if not loader_error <= 1.0:
        raise UserError(f"exported {path}: our ONNX loader differs from torch by more than {ATOL:g}")
    return {"points": int(len(inputs)), "onnxruntime_max_abs_diff": float(np.max(np.abs(runtime - expected))),
            "loader_ok": True}
