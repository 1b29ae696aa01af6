"""A phone's package of a model: ExecuTorch programs, legacy ONNX Runtime files, a manifest.

Android and iOS apps get the same ExecuTorch files (the runtime is the same
C++ library on both); what differs is the platform's name and, on Android,
the legacy ONNX Runtime Mobile inference graph. The manifest,
``package.json``, says for every file its format, sha256 and size, and how
to drive each format; the ONNX Runtime training files are marked legacy
(ONNX Runtime deprecated its training packages: 1.19.2 was the last).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from model_store.artifacts import (
    MEDIA_ONNX,
    MEDIA_SAFETENSORS,
    WEIGHTS,
    encode_weights,
    state_to_numpy,
)
from model_store.errors import ExportError
from model_store.export.classifier import output_classes
from model_store.export.executorch import (
    DEFAULT_MAX_BATCH,
    EXECUTORCH_FILES,
    INFERENCE_PROGRAM,
    KEY_PREFIX,
    MEDIA_EXECUTORCH_DATA,
    MEDIA_EXECUTORCH_PROGRAM,
    TRAINING_PROGRAM,
    export_executorch,
)
from model_store.export.onnx import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME, export_onnx
from model_store.export.ort_training import (
    CHECKPOINT,
    LABELS_NAME,
    MEDIA_ORT_CHECKPOINT,
    TRAINING_FILES,
    export_training_artifacts,
)
from model_store.ptd import PTD_WEIGHTS

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "MANIFEST",
    "MANIFEST_FORMAT_VERSION",
    "MEDIA_MANIFEST",
    "MOBILE_PLATFORMS",
    "ORT_INFERENCE_MODEL",
    "build_mobile_package",
    "mobile_artifacts",
    "package_files",
]

MANIFEST = "package.json"
MEDIA_MANIFEST = "application/json"
#: ONNX Runtime Mobile's inference graph, in the Android package only (legacy).
ORT_INFERENCE_MODEL = "inference.onnx"
MOBILE_PLATFORMS = ("android", "ios")

#: 2: ExecuTorch programs became the current format, ONNX Runtime's files legacy.
MANIFEST_FORMAT_VERSION = 2

_BATCH = "batch"
_EXECUTORCH = "executorch"
_ORT = "onnxruntime"


def package_files(platform: str) -> tuple[str, ...]:
    """Return the files of ``platform``'s package, the manifest last (it lists the others)."""
    _check_platform(platform)
    legacy = (ORT_INFERENCE_MODEL,) if platform == "android" else ()
    return (*EXECUTORCH_FILES, *legacy, *TRAINING_FILES, WEIGHTS, MANIFEST)


def build_mobile_package(
    model: nn.Module,
    input_shape: Sequence[int],
    platform: str,
    *,
    num_classes: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> dict[str, bytes]:
    """Build every file a phone app needs to evaluate and train ``model``.

    Parameters
    ----------
    model
        A torch classifier whose forward returns logits ``(batch, classes)``.
    input_shape
        One example's shape, without the batch axis.
    platform
        ``"android"`` or ``"ios"``.
    num_classes
        Checked against the model's output width when given.
    max_batch
        The largest batch the ExecuTorch programs take.

    Returns
    -------
    dict
        ``name -> bytes`` in :func:`package_files` order; ``ExportError`` when
        the model cannot be exported.
    """
    _check_platform(platform)
    shape = tuple(input_shape)
    classes = output_classes(model, shape, num_classes)
    files = export_executorch(model, shape, max_batch=max_batch)
    if platform == "android":
        files[ORT_INFERENCE_MODEL] = export_onnx(model, shape)
    files.update(export_training_artifacts(model, shape, optimizer="sgd"))
    weights = state_to_numpy(model)
    files[WEIGHTS] = encode_weights(weights)
    files[MANIFEST] = _manifest(
        files, platform, weights, input_shape=shape, num_classes=classes, max_batch=max_batch
    )
    return {name: files[name] for name in package_files(platform)}


def mobile_artifacts(
    model: nn.Module,
    input_shape: Sequence[int],
    platform: str,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> dict[str, tuple[bytes, str]]:
    """Return the package as model-version artifacts ``"<platform>/<file>" -> (bytes, media)``."""
    package = build_mobile_package(model, input_shape, platform, max_batch=max_batch)
    return {f"{platform}/{name}": (data, _media_type(name)) for name, data in package.items()}


def _manifest(
    files: Mapping[str, bytes],
    platform: str,
    weights: Mapping[str, np.ndarray],
    *,
    input_shape: Sequence[int],
    num_classes: int,
    max_batch: int,
) -> bytes:
    """Return ``package.json``: tensors, parameters, each format's use, each file's checksum."""
    ort_files = [*((ORT_INFERENCE_MODEL,) if ORT_INFERENCE_MODEL in files else ()), *TRAINING_FILES]
    doc: dict[str, Any] = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "platform": platform,
        "input": _tensor(INPUT_NAME, [_BATCH, *input_shape], "float32"),
        "output": _tensor(OUTPUT_NAME, [_BATCH, num_classes], "float32"),
        "labels": {**_tensor(LABELS_NAME, [_BATCH], "int64"), "format": "class_index"},
        "loss": "cross_entropy",
        "parameters": [
            _tensor(name, list(array.shape), np.dtype(array.dtype).name)
            for name, array in weights.items()
        ],
        _EXECUTORCH: {
            "status": "current",
            "runtime": "ExecuTorch 1.5 (org.pytorch.executorch.training on Android, "
            "executorch::extension::training on iOS)",
            "training_program": {
                "file": TRAINING_PROGRAM,
                "method": "forward",
                "inputs": [INPUT_NAME, LABELS_NAME],
                "outputs": ["loss", OUTPUT_NAME],
            },
            "inference_program": {
                "file": INFERENCE_PROGRAM,
                "method": "forward",
                "inputs": [INPUT_NAME],
                "outputs": [OUTPUT_NAME],
            },
            "weights": {"file": PTD_WEIGHTS, "key_prefix": KEY_PREFIX},
            "max_batch": max_batch,
            "optimizer": {"name": "sgd", "settings_from": "task.training", "nesterov": False},
        },
        _ORT: {
            "status": "legacy",
            "why": "ONNX Runtime deprecated its training packages; 1.19.2 was the last release",
            "onnx_opset": ONNX_OPSET,
            "files": ort_files,
            "optimizer": {"name": "sgd", "learning_rate_from": "task.training.lr"},
        },
        "files": {
            name: {
                "format": _format(name),
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
            }
            for name, data in files.items()
            if name != MANIFEST
        },
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def _format(name: str) -> str:
    """Name the format a package file belongs to."""
    if name in EXECUTORCH_FILES:
        return _EXECUTORCH
    if name == WEIGHTS:
        return "safetensors"
    return _ORT


def _media_type(name: str) -> str:
    """Return the media type a package file is stored under."""
    if name == PTD_WEIGHTS:
        return MEDIA_EXECUTORCH_DATA
    if name.endswith(".pte"):
        return MEDIA_EXECUTORCH_PROGRAM
    if name.endswith(".onnx"):
        return MEDIA_ONNX
    return {CHECKPOINT: MEDIA_ORT_CHECKPOINT, WEIGHTS: MEDIA_SAFETENSORS}.get(name, MEDIA_MANIFEST)


def _tensor(name: str, shape: Sequence[int | str], dtype: str) -> dict[str, Any]:
    """Describe one tensor the app feeds or reads."""
    return {
        "name": name,
        "shape": [d if isinstance(d, str) else int(d) for d in shape],
        "dtype": dtype,
    }


def _check_platform(platform: str) -> None:
    if platform not in MOBILE_PLATFORMS:
        raise ExportError(f"unknown mobile platform {platform!r}; known: {MOBILE_PLATFORMS}")
