"""ONNX export of the networks a benchmark folder holds, and the checks that the export computes the same thing.

Three networks can be exported for one run:
- the standard network as trained (raw images in);
- the *hull* network for AbsCert models (`hull_network`): a plain feed-forward graph (Conv, Gemm, Relu, Flatten;
  float32 constants) over the lower-end channels for 'point' — the upper ends folded into N's first layer when d
  divides 1, a 1×1 Conv + Relu form otherwise — and the 2C-channel network N itself for 'region';
- the *deployed* AbsCert classifier f = N(phi(x)), with the cell rule `abstraction.cell_index` written in float32
  ops (`ExportableCellRule`: thresholds, Floor, Clip, MatMul with tables; no Cast, no double constant), bit for bit.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..abstraction import EDGE_TOLERANCE, Abstraction, cell_index, cell_lower, cell_upper, num_cells
from ..errors import UserError

OPSET = 13
INPUT_NAME = "input"
OUTPUT_NAME = "output"
# onnxruntime and torch agree when |ort - torch| <= ATOL + RTOL·|torch| elementwise.
ATOL = 1e-5
RTOL = 1e-5


def cell_thresholds(d: float) -> np.ndarray:
    """tau_m (m = 1 … K-1): the smallest float32 that `abstraction.cell_index` puts in cell m or above. The rule
    is monotone, so for every float32 x: cell_index(x) = #{m : x >= tau_m}, exactly."""
    out = []
    for m in range(1, num_cells(d)):
        t = np.float32((m - EDGE_TOLERANCE) * d)
        while cell_index(np.asarray(t), d) >= m:
            t = np.nextafter(t, np.float32(-np.inf))
        while cell_index(np.asarray(t), d) < m:
            t = np.nextafter(t, np.float32(np.inf))
        out.append(t)
    return np.asarray(out, dtype=np.float32)


class ExportableCellRule(nn.Module):
    """`abstraction.cell_index` / `cell_lower` / `cell_upper` in float32 ops only (no Cast, no double constant),
    bit for bit: step_m = clip(floor(x - tau_m) + 1, 0, 1) is [x >= tau_m] (x - tau_m rounds to a float of the
    same sign, zero only when equal; Floor is exact), the one-hot cell vector is steps·D + e (integers), and the
    ends are one-hot · table (one nonzero term: exact) with the tables cell_lower(k), cell_upper(k)."""

    thresholds: torch.Tensor  # buffers (register_buffer), declared for the type checker
    difference: torch.Tensor
    first: torch.Tensor
    lower_table: torch.Tensor
    upper_table: torch.Tensor

    def __init__(self, d: float) -> None:
        super().__init__()
        cells = num_cells(d)
        difference = np.zeros((max(cells - 1, 1), cells), dtype=np.float32)
        for m in range(1, cells):
            difference[m - 1, m - 1], difference[m - 1, m] = -1.0, 1.0
        first = np.zeros(cells, dtype=np.float32)
        first[0] = 1.0
        self.register_buffer("thresholds", torch.from_numpy(cell_thresholds(d)))
        self.register_buffer("difference", torch.from_numpy(difference))
        self.register_buffer("first", torch.from_numpy(first))
        # K×1 tables (a 2-D MatMul weight, which onnx2pytorch turns into a Linear), then Squeeze of the last axis
        self.register_buffer("lower_table", torch.from_numpy(cell_lower(np.arange(cells), d)).reshape(cells, 1))
        self.register_buffer("upper_table", torch.from_numpy(cell_upper(np.arange(cells), d)).reshape(cells, 1))

    def onehot(self, x: torch.Tensor) -> torch.Tensor:
        """x (…) → (…, K): 1 at the cell of each value, 0 elsewhere."""
        if len(self.thresholds) == 0:  # d = 1: a single cell
            return x.unsqueeze(-1) * 0.0 + self.first
        steps = torch.clamp(torch.floor(x.unsqueeze(-1) - self.thresholds) + 1.0, 0.0, 1.0)
        return torch.matmul(steps, self.difference) + self.first

    def lower(self, onehot: torch.Tensor) -> torch.Tensor:
        """cell_lower of the cell (float32)."""
        return torch.matmul(onehot, self.lower_table).squeeze(-1)

    def upper(self, onehot: torch.Tensor) -> torch.Tensor:
        """cell_upper of the cell (float32)."""
        return torch.matmul(onehot, self.upper_table).squeeze(-1)


class ExportableDeployed(nn.Module):
    """The deployed classifier f(x) = N(abstraction(x)) for raw images, written for ONNX export."""

    def __init__(self, abstraction: Abstraction, network: nn.Module) -> None:
        super().__init__()
        self.variant = abstraction.variant
        self.cells = ExportableCellRule(abstraction.d)
        self.network = network
        self.eps = float(np.float32(abstraction.eps))

    def abstract(self, x: torch.Tensor) -> torch.Tensor:
        """2C-channel abstract input (same values as `Abstraction.__call__`)."""
        if self.variant == "point":
            k = self.cells.onehot(x)
            return torch.cat([self.cells.lower(k), self.cells.upper(k)], dim=1)
        low = torch.clamp(x - self.eps, 0.0, 1.0)
        high = torch.clamp(x + self.eps, 0.0, 1.0)
        return torch.cat([self.cells.lower(self.cells.onehot(low)), self.cells.upper(self.cells.onehot(high))], dim=1)

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


def _layers(network: nn.Module) -> list[nn.Module] | None:
    """The layers of a (nested) nn.Sequential in order, or None for another kind of module."""
    if not isinstance(network, nn.Sequential):
        return None
    layers: list[nn.Module] = []
    for layer in network:
        inner = _layers(layer) if isinstance(layer, nn.Sequential) else [layer]
        if inner is None:
            return None
        layers += inner
    return layers


def _first_affine(network: nn.Module) -> tuple[list[nn.Module], nn.Conv2d | nn.Linear, list[nn.Module]] | None:
    """(layers before, first affine layer, layers after) when N starts with an unpadded Conv2d (groups 1) or
    Flatten + Linear, the two forms whose constant input term is a plain bias; else None."""
    layers = _layers(network)
    if not layers:
        return None
    first = layers[0]
    if isinstance(first, nn.Conv2d) and first.groups == 1 and not isinstance(first.padding, str) \
            and all(p == 0 for p in first.padding):
        return [], first, layers[1:]
    if len(layers) > 1 and isinstance(first, nn.Flatten) and isinstance(layers[1], nn.Linear):
        return [first], layers[1], layers[2:]
    return None


def _conv1x1(weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A 1×1 convolution (out × in weight matrix, bias) as float32."""
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], 1)
    with torch.no_grad():
        conv.weight.copy_(weight.reshape(*weight.shape, 1, 1).float())
        assert conv.bias is not None  # bias=True
        conv.bias.copy_(bias.float())
    return conv


def _folded(layer: nn.Conv2d | nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d | nn.Linear:
    """A copy of `layer` reading weight.shape[1] inputs, with the given (float64) weight and bias as float32."""
    new = copy.deepcopy(layer)
    new.weight = nn.Parameter(weight.float(), requires_grad=False)
    new.bias = nn.Parameter(bias.float(), requires_grad=False)
    if isinstance(new, nn.Conv2d):
        new.in_channels = int(weight.shape[1])
    else:
        new.in_features = int(weight.shape[1])
    return new


def _channels(network: nn.Module, channels: int | None) -> int:
    """C, the image channels of the hull network's input: given, or half of N's input channels."""
    if channels is not None:
        return int(channels)
    shape = getattr(network, "input_shape", None)  # our ONNX loader's modules: (batch, 2C, H, W)
    if shape is None:
        raise UserError("hull_network: pass the number of image channels for this network")
    return int(shape[1]) // 2


def _relu_form(channels: int, d: float) -> list[nn.Module]:
    """[L, relu(L + d - 1)] from L >= 0: a 1×1 Conv (weights [I; I], bias [0; d - 1]) and a Relu."""
    eye, zero = torch.eye(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
    return [_conv1x1(torch.cat([eye, eye]), torch.cat([zero, zero + (d - 1.0)])), nn.ReLU()]


def hull_network(abstraction: Abstraction, network: nn.Module, channels: int | None = None) -> nn.Module:
    """The network over the hull box, as a plain feed-forward graph (Conv/Gemm/Relu/Flatten, float32 constants).

    'region': N itself (2C channels in). 'point': lower ends L in (C channels), computing N([L, U]) with
    U = min(L + d, 1), for L >= 0 (every hull box):
    - d divides 1 (`divides_one`: U = L + d on every cell, the last one included): the upper ends are folded into
      N's first affine layer, W = W_lower + W_upper and b = b + W_upper·d; no extra op;
    - otherwise U = L + d - relu(L + d - 1): a 1×1 Conv [L, L + d - 1] then Relu (relu(L) = L for L >= 0) gives
      [L, R], and the first layer reads it with W = [W_lower + W_upper, -W_upper], b = b + W_upper·d.
    When N's first affine layer is not an unpadded Conv2d or Flatten + Linear (a padded convolution's constant
    term is not a bias, or N is an arbitrary module) a 1×1 Conv computes [L, U] in front of N instead (after the
    Relu above when d does not divide 1). `channels` (C) is needed only then, and is read from
    `network.input_shape` (our ONNX loader's modules) when not given.
    The result equals N([L, min(L + d, 1)]) in exact arithmetic; in float32 up to the rounding of the folded
    first layer (a few ulp of its outputs)."""
    if abstraction.variant != "point":
        return network
    from ..training.lower_form import divides_one

    d = float(abstraction.d)
    exact = divides_one(d)
    parts = _first_affine(network)
    f64 = torch.float64
    if parts is None:
        c = _channels(network, channels)
        eye, zero = torch.eye(c, dtype=f64), torch.zeros(c, dtype=f64)
        if exact:
            return nn.Sequential(_conv1x1(torch.cat([eye, eye]), torch.cat([zero, zero + d])), network).eval()
        upper = _conv1x1(torch.cat([torch.cat([eye, 0 * eye], 1), torch.cat([eye, -eye], 1)]),
                         torch.cat([zero, zero + d]))
        return nn.Sequential(*_relu_form(c, d), upper, network).eval()
    before, first, after = parts
    weight, bias = first.weight.detach().to(f64), first.bias
    bias64 = bias.detach().to(f64) if bias is not None else torch.zeros(weight.shape[0], dtype=f64)
    half = weight.shape[1] // 2
    w_lower, w_upper = weight[:, :half], weight[:, half:]
    constant = bias64 + d * w_upper.reshape(weight.shape[0], -1).sum(1)
    if exact:
        return nn.Sequential(*before, _folded(first, w_lower + w_upper, constant), *after).eval()
    c = first.in_channels // 2 if isinstance(first, nn.Conv2d) else _channels(network, channels)
    prefix = _relu_form(c, d)
    folded = _folded(first, torch.cat([w_lower + w_upper, -w_upper], 1), constant)
    return nn.Sequential(*prefix, *before, folded, *after).eval()


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
