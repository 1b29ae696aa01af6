"""Exports of a torch model to the formats devices and the evaluator run.

torch (and onnx) are imported only when an export function is called.
"""

from __future__ import annotations

from model_store.export.onnx import ONNX_OPSET, export_onnx
from model_store.export.ort_training import (
    MEDIA_ORT_CHECKPOINT,
    TRAINING_FILES,
    export_training_artifacts,
    parameter_order,
)
from model_store.export.torchscript import (
    export_torchscript,
    export_torchscript_lite,
    export_torchscript_lite_functional,
)

__all__ = [
    "MEDIA_ORT_CHECKPOINT",
    "ONNX_OPSET",
    "TRAINING_FILES",
    "export_onnx",
    "export_torchscript",
    "export_torchscript_lite",
    "export_torchscript_lite_functional",
    "export_training_artifacts",
    "parameter_order",
]
