"""VNN-COMP export and run-back: ONNX networks, VNN-LIB properties, instances.csv, and our own loader."""
from .benchmark import export_benchmark, hull_box, pick_images
from .onnx_loader import SUPPORTED_OPS, OnnxModule, load_onnx
from .runback import format_result, read_result, run_benchmark
from .vnnlib import VnnlibProperty, format_vnnlib, format_vnnlib2, read_vnnlib, robustness_violation

__all__ = [
    "SUPPORTED_OPS", "OnnxModule", "VnnlibProperty", "export_benchmark", "format_result", "format_vnnlib",
    "format_vnnlib2", "hull_box", "load_onnx", "pick_images", "read_result", "read_vnnlib",
    "robustness_violation", "run_benchmark",
]
