"""The standard artifacts of a model version: weights, ONNX graph, TorchScript."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.numpy

from model_store.errors import StoreError
from model_store.export.onnx import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME, export_onnx
from model_store.export.torchscript import export_torchscript
from model_store.zoo import ModelSpec, build_model

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "MEDIA_ONNX",
    "MEDIA_SAFETENSORS",
    "MEDIA_TORCHSCRIPT",
    "ONNX",
    "TORCHSCRIPT",
    "WEIGHTS",
    "build_initial_artifacts",
    "decode_weights",
    "encode_weights",
    "state_to_numpy",
]

WEIGHTS = "weights.safetensors"
ONNX = "model.onnx"
TORCHSCRIPT = "model.torchscript.pt"

MEDIA_SAFETENSORS = "application/vnd.fedmq.safetensors"
MEDIA_ONNX = "application/onnx"
MEDIA_TORCHSCRIPT = "application/vnd.fedmq.torchscript"


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """Copy a model's state_dict into float32 numpy arrays.

    Parameters
    ----------
    model
        The torch model.

    Returns
    -------
    dict
        ``name -> array`` in state_dict order; C-contiguous float32 copies,
        so changing them does not change the model.
    """
    return {
        name: np.array(
            tensor.detach().cpu().float().numpy(), dtype=np.float32, order="C", copy=True
        )
        for name, tensor in model.state_dict().items()
    }


def encode_weights(weights: Mapping[str, np.ndarray]) -> bytes:
    """Serialize named arrays as safetensors (the wire codec's format too).

    Parameters
    ----------
    weights
        ``name -> array``.

    Returns
    -------
    bytes
        The safetensors document.
    """
    # safetensors refuses non-contiguous arrays; a transposed view is common.
    arrays = {name: np.ascontiguousarray(array) for name, array in weights.items()}
    try:
        return safetensors.numpy.save(arrays)
    except Exception as exc:  # safetensors' Rust errors have no common base
        raise StoreError(f"cannot encode weights: {exc}") from exc


def decode_weights(data: bytes) -> dict[str, np.ndarray]:
    """Parse a safetensors document into named arrays.

    Parameters
    ----------
    data
        Bytes written by :func:`encode_weights`.

    Returns
    -------
    dict
        ``name -> array``.
    """
    try:
        return safetensors.numpy.load(data)
    except Exception as exc:  # safetensors' Rust errors have no common base
        raise StoreError(f"cannot decode weights: {exc}") from exc


def build_initial_artifacts(
    spec: ModelSpec, *, seed: int
) -> tuple[dict[str, tuple[bytes, str]], dict[str, Any]]:
    """Build a zoo model and everything version 0 of it needs in the store.

    Parameters
    ----------
    spec
        The zoo model to build.
    seed
        Seeds the initial weights.

    Returns
    -------
    tuple
        ``(artifacts, metadata)``: artifacts by name as ``(bytes, media
        type)`` for :data:`WEIGHTS`, :data:`ONNX` and :data:`TORCHSCRIPT`,
        ready for ``ModelStore.publish``; and the JSON-able metadata (spec,
        seed, parameter shapes, input and output names).

    Notes
    -----
    The weights and ONNX bytes depend only on ``spec``, ``seed`` and the
    torch version; the TorchScript bytes also vary between processes (see
    :func:`~model_store.export.torchscript.export_torchscript`), so a
    republish of version 0 from a new process conflicts: check
    ``latest_version`` first.
    """
    model = build_model(spec, seed=seed)
    weights = state_to_numpy(model)
    artifacts = {
        WEIGHTS: (encode_weights(weights), MEDIA_SAFETENSORS),
        ONNX: (export_onnx(model, spec.input_shape), MEDIA_ONNX),
        TORCHSCRIPT: (export_torchscript(model), MEDIA_TORCHSCRIPT),
    }
    metadata: dict[str, Any] = {
        "spec": spec.to_config(),
        "seed": seed,
        "parameters": {
            name: {"shape": list(array.shape), "dtype": "float32"}
            for name, array in weights.items()
        },
        "num_parameters": int(sum(array.size for array in weights.values())),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "onnx_opset": ONNX_OPSET,
    }
    return artifacts, metadata
