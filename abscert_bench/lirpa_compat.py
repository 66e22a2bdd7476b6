"""Make auto_LiRPA 0.3 importable and working on torch >= 2.x and numpy 2.

Import `lirpa()` from here instead of importing auto_LiRPA directly: each shim is applied only when
the running library actually lacks the thing, so a newer auto_LiRPA built from source also works.
"""
from __future__ import annotations

import importlib
import inspect
import sys
import types
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

_APPLIED: list[str] = []


def _shim_numpy_arraysetops() -> None:
    """numpy 2 removed `numpy.lib.arraysetops`; auto_LiRPA imports `isin` from it."""
    import numpy

    try:
        importlib.import_module("numpy.lib.arraysetops")
        return
    except ImportError:
        pass
    alias = types.ModuleType("numpy.lib.arraysetops")
    alias.isin = numpy.isin  # type: ignore[attr-defined]
    sys.modules["numpy.lib.arraysetops"] = alias
    _APPLIED.append("numpy.lib.arraysetops")


def _shim_set_opset_version() -> None:
    """torch removed `symbolic_helper._set_opset_version`; set the opset on the exporter's GLOBALS."""
    symbolic_helper = importlib.import_module("torch.onnx.symbolic_helper")
    if hasattr(symbolic_helper, "_set_opset_version"):
        return
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    def _set_opset_version(opset_version: int) -> None:
        GLOBALS.export_onnx_opset_version = opset_version

    symbolic_helper._set_opset_version = _set_opset_version  # type: ignore[attr-defined]
    _APPLIED.append("symbolic_helper._set_opset_version")


def _shim_node_getitem() -> None:
    """`torch._C.Node` is no longer subscriptable; route `node[key]` to `_node_get`."""
    import torch

    symbolic_helper = importlib.import_module("torch.onnx.symbolic_helper")
    if hasattr(torch._C.Node, "__getitem__"):
        return
    torch._C.Node.__getitem__ = lambda node, key: symbolic_helper._node_get(node, key)  # type: ignore
    _APPLIED.append("torch._C.Node.__getitem__")


def _shim_gather_elements() -> None:
    """Register `aten::gather` → ONNX GatherElements for opset >= 11 when torch has not loaded that symbolic.

    auto_LiRPA exports at opset 12, but torch >= 2.x registers only the opset-9/10 symbolics unless a full
    `torch.onnx.export` ran first; opset 9 writes gather as OneHot·Mul·ReduceSum, which auto_LiRPA cannot bound.
    `torch.gather` appears in auto_LiRPA's CrossEntropyWrapper (loss fusion). Only this one op is registered.
    """
    import torch

    registration = importlib.import_module("torch.onnx._internal.torchscript_exporter.registration")
    group = registration.registry.get_function_group("aten::gather")
    if group is not None and group.get(12) is not None and group.get(12) is not group.get(9):
        return
    symbolic_helper = importlib.import_module("torch.onnx.symbolic_helper")

    @symbolic_helper.parse_args("v", "i", "v", "v")
    def gather(g, self, dim, index, sparse_grad=False):
        return g.op("GatherElements", self, index, axis_i=dim)

    torch.onnx.register_custom_op_symbolic("aten::gather", gather, 11)
    _APPLIED.append("aten::gather opset-11 symbolic")


def _shim_named_members(bound_module_cls: type[nn.Module]) -> None:
    """auto_LiRPA's `_named_members` override lacks torch's newer `remove_duplicate` argument."""
    original = bound_module_cls._named_members
    if "remove_duplicate" in inspect.signature(original).parameters:
        return

    def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
        return original(self, get_members_fn, prefix, recurse)

    bound_module_cls._named_members = _named_members  # type: ignore[method-assign]  # patching auto_LiRPA's class
    _APPLIED.append("BoundedModule._named_members")


def _quiet_batched_crown() -> None:
    """auto_LiRPA 0.3's batched CROWN (bound option `crown_batch_size`) prints a line and a tqdm bar per
    intermediate layer: inside `backward_bound` only, `print` and `tqdm` become silent."""
    backward = sys.modules.get("auto_LiRPA.backward_bound")
    batched = getattr(backward, "batched_backward", None)
    if backward is None or batched is None or "Batched CROWN" not in inspect.getsource(batched):
        return
    backward.print = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    backward.tqdm = lambda iterable, *args, **kwargs: iterable  # type: ignore[attr-defined]
    _APPLIED.append("quiet batched CROWN")


def _import_keeping_warning_filters(name: str) -> ModuleType:
    """Import `name` without letting it change the process's warning filters.

    auto_LiRPA calls `warnings.simplefilter("once")` at import (bound_general.py, utils.py), which turns on every
    DeprecationWarning of every library for the rest of the process, and its operators' `@torch.jit.script`
    raise torch's deprecation warning while it imports. The filters are restored afterwards and warnings raised
    during the import are re-issued through them, except that one known torch.jit deprecation."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        module = importlib.import_module(name)
    for w in caught:
        if issubclass(w.category, DeprecationWarning) and str(w.message).startswith("`torch.jit.script` is deprecated"):
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return module


def lirpa() -> ModuleType:
    """Return the `auto_LiRPA` module with every needed compatibility shim applied."""
    if getattr(lirpa, "_done", False):
        return sys.modules["auto_LiRPA"]
    _shim_numpy_arraysetops()
    _shim_set_opset_version()
    _shim_node_getitem()
    _shim_gather_elements()
    try:
        module = _import_keeping_warning_filters("auto_LiRPA")
    except ImportError as exc:
        from .errors import UserError

        raise UserError(
            f"auto_LiRPA is not importable ({exc}); install it with: pip install --no-deps auto-lirpa==0.3"
        ) from None
    _shim_named_members(module.BoundedModule)
    _quiet_batched_crown()
    lirpa._done = True  # type: ignore[attr-defined]
    return module


def applied_shims() -> list[str]:
    """Names of the shims this process needed (empty on a fully compatible auto_LiRPA)."""
    return list(_APPLIED)
