"""The iOS package's manifest (``package.json``): what each file is and how to feed it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from model_store.export.onnx import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME
from model_store.export.ort_training import LABELS_NAME

__all__ = ["FORMAT_VERSION", "package_manifest"]

#: Bumped when a field changes meaning; apps refuse versions they do not know.
FORMAT_VERSION = 1

_BATCH = "batch"


def package_manifest(
    files: Mapping[str, bytes],
    *,
    weights: Mapping[str, np.ndarray],
    input_shape: Sequence[int],
    num_classes: int,
    lite_file: str,
    lite_weight_inputs: Sequence[str],
) -> bytes:
    """Return ``package.json`` describing the package's ``files``.

    The fields are the Android package's (so one app-side reader serves
    both; ``onnx_opset`` and ``labels`` concern the ONNX Runtime training
    files), with ``platform`` ``"ios"`` and a ``lite_module`` section: the
    TorchScript lite file and the order of its ``forward`` inputs.

    Parameters
    ----------
    files
        The package's other files by name; each is listed with its sha256 and size.
    weights
        The weights file's tensors, in the order the manifest lists them.
    input_shape
        One example's shape, without the batch axis.
    num_classes
        The width of the model's output.
    lite_file
        The name of the TorchScript lite module among ``files``.
    lite_weight_inputs
        The weight names ``forward`` takes after the input, in order.

    Returns
    -------
    bytes
        The manifest, UTF-8 JSON, keys in a fixed order.
    """
    doc: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "platform": "ios",
        "onnx_opset": ONNX_OPSET,
        "input": {"name": INPUT_NAME, "shape": [_BATCH, *input_shape], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": [_BATCH, num_classes], "dtype": "float32"},
        "labels": {
            "name": LABELS_NAME,
            "shape": [_BATCH],
            "dtype": "int64",
            "format": "class_index",
        },
        "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "learning_rate_from": "task.training.lr"},
        "parameters": [
            {"name": name, "shape": list(array.shape), "dtype": np.dtype(array.dtype).name}
            for name, array in weights.items()
        ],
        "lite_module": {
            "file": lite_file,
            "method": "forward",
            "inputs": [INPUT_NAME, *lite_weight_inputs],
            "output": OUTPUT_NAME,
        },
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for name, data in files.items()
        },
    }
    return (json.dumps(doc, indent=2) + "\n").encode()
