"""Exports of a torch model to the formats devices and the evaluator run.

torch (and onnx) are imported only when an export function is called.
"""

from __future__ import annotations

from model_store.export.onnx import ONNX_OPSET, export_onnx
from model_store.export.torchscript import export_torchscript, export_torchscript_lite

__all__ = ["ONNX_OPSET", "export_onnx", "export_torchscript", "export_torchscript_lite"]
