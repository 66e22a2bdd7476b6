"""Our own ONNX → torch loader for the ops the exporter emits (no onnx2torch).

The result is a plain `nn.Module` that auto_LiRPA can trace: weights are parameters, other constants are
buffers, constant sub-graphs (Reshape shapes, Constant nodes) are folded at load time. Anything else is a
one-line UserError naming the file and the op.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

SUPPORTED_OPS = (
    "Add", "AveragePool", "Cast", "Clip", "Concat", "Constant", "Conv", "Div", "Flatten", "Floor", "Gemm",
    "Identity", "MatMul", "Max", "Min", "Mul", "Neg", "Relu", "Reshape", "Sigmoid", "Squeeze", "Sub", "Tanh",
    "Unsqueeze",
)

# ONNX TensorProto element types → torch dtypes (the ones a Cast may name).
ONNX_DTYPES = {1: torch.float32, 6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16,
               11: torch.float64}


def read_onnx(path: Path):
    """Load and check an ONNX file; a missing, truncated or invalid file is a UserError naming it."""
    import onnx

    from .vnnlib import read_stored, stored_path

    path = Path(path)
    if not stored_path(path).is_file():
        raise UserError(f"missing ONNX file {path}")
    try:
        model = onnx.load_model_from_string(read_stored(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # DecodeError, ValidationError, ...
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"malformed ONNX file {path}: {message[:200]}") from None
    return model


def _attributes(node) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _constant_value(node, path: Path) -> np.ndarray:
    from onnx import numpy_helper

    attrs = _attributes(node)
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    if "value_float" in attrs:
        return np.asarray(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.asarray(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.asarray(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.asarray(attrs["value_ints"], dtype=np.int64)
    raise UserError(f"{path}: Constant node {node.name!r} has an unsupported value attribute")


def _symmetric_pads(pads: list[int], node, path: Path) -> list[int]:
    half = len(pads) // 2
    begin, end = pads[:half], pads[half:]
    if begin != end:
        raise UserError(f"{path}: {node.op_type} node {node.name!r} has asymmetric pads {pads}")
    return begin


class OnnxModule(nn.Module):
    """An ONNX graph run node by node with torch ops; single input, single output."""

    def __init__(self, model, path: Path) -> None:
        super().__init__()
        graph = model.graph
        self.path = Path(path)
        unsupported = sorted({n.op_type for n in graph.node if n.op_type not in SUPPORTED_OPS})
        if unsupported:
            raise UserError(
                f"{path}: unsupported ONNX op(s) {', '.join(unsupported)}; supported: {', '.join(SUPPORTED_OPS)}"
            )
        from onnx import numpy_helper

        initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise UserError(f"{path}: expected one input and one output, got {len(inputs)} and {len(graph.output)}")
        self.input_name = inputs[0].name
        self.output_name = graph.output[0].name
        dims = inputs[0].type.tensor_type.shape.dim
        self.input_shape = tuple(int(d.dim_value) if d.dim_value > 0 else 1 for d in dims)
        out_dims = graph.output[0].type.tensor_type.shape.dim
        self.output_shape = tuple(int(d.dim_value) if d.dim_value > 0 else 1 for d in out_dims)
        self.op_types = [n.op_type for n in graph.node]
        self._names: dict[str, str] = {}  # ONNX tensor name → attribute name of a registered constant
        self._constants: dict[str, np.ndarray] = dict(initializers)
        weight_inputs = {n.input[i] for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
                         for i in range(1, len(n.input)) if n.input[i]}
        self._steps: list[tuple[list[str], list[str], Callable[..., Any]]] = []
        self._step_ops: list[str] = []
        for node in graph.node:
            fn = self._compile(node)
            if node.op_type == "Constant":
                self._constants[node.output[0]] = _constant_value(node, self.path)
                continue
            if node.input and all((name in self._constants) or not name for name in node.input):
                self._constants[node.output[0]] = self._fold(fn, node)
                continue
            self._steps.append((list(node.input), list(node.output), fn))
            self._step_ops.append(node.op_type)
        # Weights become parameters (auto_LiRPA's BoundParams); other constants stay plain tensors, which
        # tracing records as graph constants, as for a Python scalar in the original module.
        self._plain: dict[str, torch.Tensor] = {}
        for name in sorted({i for ins, _, _ in self._steps for i in ins if i in self._constants}):
            tensor = torch.from_numpy(np.array(self._constants[name]))
            if name in weight_inputs and tensor.is_floating_point():
                attr = f"weight_{len(self._names)}"
                self.register_parameter(attr, nn.Parameter(tensor, requires_grad=False))
                self._names[name] = attr
            else:
                self._plain[name] = tensor
        self.eval()

    def _constant(self, name: str) -> torch.Tensor:
        if name in self._names:
            return getattr(self, self._names[name])
        return self._plain[name]

    def _fold(self, fn: Callable[..., Any], node) -> np.ndarray:
        args = [torch.from_numpy(np.array(self._constants[n])) if n else None for n in node.input]
        with torch.no_grad():
            return fn(*args).numpy()

    def _compile(self, node) -> Callable[..., Any]:
        """A torch function of the node's inputs (None for absent optional inputs)."""
        op, attrs, path = node.op_type, _attributes(node), self.path
        if op in ("Add", "Sub", "Mul", "Div"):
            binary: dict[str, Callable[..., Any]] = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul,
                                                     "Div": torch.div}
            return binary[op]
        if op in ("Relu", "Sigmoid", "Tanh", "Floor", "Neg"):
            return {"Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Floor": torch.floor,
                    "Neg": torch.neg}[op]
        if op == "Identity":
            return lambda x: x
        if op == "MatMul":
            return torch.matmul
        if op == "Constant":
            return lambda: None
        if op == "Cast":
            dtype = ONNX_DTYPES.get(int(attrs["to"]))
            if dtype is None:
                raise UserError(f"{path}: Cast node {node.name!r} to unsupported type {attrs['to']}")
            return lambda x: x.to(dtype)
        if op in ("Min", "Max"):
            pair = torch.minimum if op == "Min" else torch.maximum

            def reduce(*xs):
                out = xs[0]
                for other in xs[1:]:
                    out = pair(out, other)
                return out
            return reduce
        if op == "Clip":
            lo_attr, hi_attr = attrs.get("min"), attrs.get("max")

            def clip(x, lo=None, hi=None):
                lo = lo if lo is not None else (None if lo_attr is None else torch.tensor(lo_attr, dtype=x.dtype))
                hi = hi if hi is not None else (None if hi_attr is None else torch.tensor(hi_attr, dtype=x.dtype))
                if lo is not None:
                    x = torch.maximum(x, lo.to(x.dtype))
                if hi is not None:
                    x = torch.minimum(x, hi.to(x.dtype))
                return x
            return clip
        if op == "Concat":
            axis = int(attrs["axis"])
            return lambda *xs: torch.cat(xs, dim=axis)
        if op == "Flatten":
            axis = int(attrs.get("axis", 1))

            def flatten(x):
                if axis == 0:
                    return x.reshape(1, -1)
                out = torch.flatten(x, axis)
                return torch.flatten(out, 0, axis - 1) if axis > 1 else out
            return flatten
        if op == "Unsqueeze":
            axes_attr = attrs.get("axes")

            def unsqueeze(x, axes=None):
                chosen = [int(a) for a in (axes.tolist() if axes is not None else axes_attr)]
                rank = x.dim() + len(chosen)
                for axis in sorted(a % rank for a in chosen):
                    x = x.unsqueeze(axis)
                return x
            return unsqueeze
        if op == "Squeeze":
            squeeze_attr = attrs.get("axes")

            def squeeze(x, axes=None):
                chosen = axes.tolist() if axes is not None else squeeze_attr
                if chosen is None:
                    return x.squeeze()
                for axis in sorted((int(a) % x.dim() for a in chosen), reverse=True):
                    x = x.squeeze(axis)
                return x
            return squeeze
        if op == "Reshape":
            if attrs.get("allowzero", 0):
                raise UserError(f"{path}: Reshape node {node.name!r} with allowzero=1 is not supported")

            def reshape(x, shape):
                target = [int(v) for v in (shape.tolist() if isinstance(shape, torch.Tensor) else shape)]
                target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
                return x.reshape(target)
            return reshape
        if op == "Gemm":
            alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
            trans_a, trans_b = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))

            def gemm(a, b, c=None):
                if trans_a:
                    a = a.t()
                if trans_b and alpha == 1.0 and beta == 1.0:
                    return F.linear(a, b, c)
                out = torch.matmul(a, b.t() if trans_b else b)
                if alpha != 1.0:
                    out = out * alpha
                if c is not None:
                    out = out + (c * beta if beta != 1.0 else c)
                return out
            return gemm
        if op == "Conv":
            if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise UserError(f"{path}: Conv node {node.name!r} uses auto_pad, which is not supported")
            strides = list(attrs.get("strides", [1, 1]))
            dilations = list(attrs.get("dilations", [1, 1]))
            group = int(attrs.get("group", 1))
            pads = _symmetric_pads(list(attrs.get("pads", [0, 0, 0, 0])), node, path)
            if len(strides) != 2:
                raise UserError(f"{path}: Conv node {node.name!r} is not 2-D")

            def conv(x, w, b=None):
                return F.conv2d(x, w, b, stride=strides, padding=pads, dilation=dilations, groups=group)
            return conv
        if op == "AveragePool":
            kernel = list(attrs["kernel_shape"])
            strides = list(attrs.get("strides", [1] * len(kernel)))
            pads = _symmetric_pads(list(attrs.get("pads", [0] * 2 * len(kernel))), node, path)
            include = bool(attrs.get("count_include_pad", 0))
            ceil = bool(attrs.get("ceil_mode", 0))
            if len(kernel) != 2:
                raise UserError(f"{path}: AveragePool node {node.name!r} is not 2-D")

            def avg_pool(x):
                return F.avg_pool2d(x, kernel, strides, pads, ceil_mode=ceil, count_include_pad=include)
            return avg_pool
        raise UserError(f"{path}: unsupported ONNX op {op}")  # pragma: no cover  (filtered above)

    def run(self, x: torch.Tensor, replace_relus: list[torch.Tensor] | None = None,
            ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(every ReLU's input in graph order, the output). With `replace_relus`, ReLU k's output is taken from
        replace_relus[k] (reshaped to its input's shape) instead of being computed: the rest of the graph then is
        a function of x and those values (how `milp.extract` reads a ReLU network as a piecewise-linear one)."""
        values: dict[str, Any] = {self.input_name: x}
        relu_inputs: list[torch.Tensor] = []
        for (inputs, outputs, fn), op in zip(self._steps, self._step_ops):
            args = [values[n] if n in values else (self._constant(n) if n else None) for n in inputs]
            if op == "Relu":
                z = args[0]
                assert isinstance(z, torch.Tensor)
                relu_inputs.append(z)
                if replace_relus is not None:
                    values[outputs[0]] = replace_relus[len(relu_inputs) - 1].reshape(z.shape)
                    continue
            values[outputs[0]] = fn(*args)
        if self.output_name not in values:
            raise UserError(f"{self.path}: the output does not depend on the input")
        return relu_inputs, values[self.output_name]

    def float64_copy(self) -> OnnxModule:
        """A copy computing in float64 (weights and constants converted; the graph has no Cast for this to make
        sense — `milp.extract` only uses it on Cast-free graphs)."""
        import copy

        twin = copy.deepcopy(self).double()
        twin._plain = {k: (v.double() if v.is_floating_point() else v) for k, v in twin._plain.items()}
        return twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[1]


def load_onnx(path: str | Path) -> OnnxModule:
    """Read, check and convert an ONNX file into a torch module (see SUPPORTED_OPS)."""
    path = Path(path)
    return OnnxModule(read_onnx(path), path)
