"""The Android package's manifest, ``package.json``: what an app needs to drive the files."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from android_bridge.layout import MANIFEST, PLATFORM
from model_store.export.onnx import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME
from model_store.export.ort_training import LABELS_NAME

__all__ = ["MANIFEST_FORMAT_VERSION", "build_manifest"]

#: Bumped when the manifest's layout changes incompatibly; apps check it.
MANIFEST_FORMAT_VERSION = 1

# The batch axis is dynamic in every graph; the manifest names it.
_BATCH = "batch"


def build_manifest(
    files: Mapping[str, bytes],
    weights: Mapping[str, np.ndarray],
    *,
    input_shape: Sequence[int],
    output_shape: Sequence[int | str],
) -> bytes:
    """Return ``package.json`` for the package's other files.

    Parameters
    ----------
    files
        Every other file of the package, by name.
    weights
        The tensors of the weights file, in the order to list them.
    input_shape
        One example's shape, without the batch axis.
    output_shape
        The inference output's shape, without the batch axis.

    Returns
    -------
    bytes
        UTF-8 JSON: format version, platform, input/output/labels tensors,
        loss, optimizer, parameters (name, shape, dtype) and each file's
        sha256 and size.
    """
    document: dict[str, Any] = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "platform": PLATFORM,
        "onnx_opset": ONNX_OPSET,
        "input": _tensor(INPUT_NAME, [_BATCH, *input_shape], "float32"),
        "output": _tensor(OUTPUT_NAME, [_BATCH, *output_shape], "float32"),
        "labels": {
            **_tensor(LABELS_NAME, [_BATCH], "int64"),
            "format": "class_index",
        },
        "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "learning_rate_from": "task.training.lr"},
        "parameters": [
            _tensor(name, list(array.shape), _dtype(array)) for name, array in weights.items()
        ],
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for name, data in files.items()
            if name != MANIFEST
        },
    }
    return (json.dumps(document, indent=2) + "\n").encode()


def _tensor(name: str, shape: Sequence[int | str], dtype: str) -> dict[str, Any]:
    """Describe one tensor the app feeds or reads."""
    return {
        "name": name,
        "shape": [d if isinstance(d, str) else int(d) for d in shape],
        "dtype": dtype,
    }


def _dtype(array: np.ndarray) -> str:
    """Name an array's dtype as the manifest and safetensors readers do."""
    return str(np.dtype(array.dtype).name)
