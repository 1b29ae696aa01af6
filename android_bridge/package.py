"""Build the Android package of a torch model: graphs, training artifacts, weights, manifest."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from android_bridge.layout import (
    ARTIFACT_PREFIX,
    INFERENCE_MODEL,
    MANIFEST,
    MEDIA_MANIFEST,
    PACKAGE_FILES,
    TRAINING_FILES,
    WEIGHTS,
)
from android_bridge.manifest import build_manifest
from model_store.artifacts import MEDIA_ONNX, MEDIA_SAFETENSORS, encode_weights, state_to_numpy
from model_store.errors import ExportError
from model_store.export import MEDIA_ORT_CHECKPOINT, export_onnx, export_training_artifacts
from model_store.export.ort_training import CHECKPOINT, TRAINING_MODEL, parameter_order
from model_store.ort import import_without_torch

if TYPE_CHECKING:
    from torch import nn

__all__ = ["android_artifacts", "build_android_package"]

_MEDIA_TYPES = {
    INFERENCE_MODEL: MEDIA_ONNX,
    **{name: MEDIA_ONNX for name in TRAINING_FILES if name != CHECKPOINT},
    CHECKPOINT: MEDIA_ORT_CHECKPOINT,
    WEIGHTS: MEDIA_SAFETENSORS,
    MANIFEST: MEDIA_MANIFEST,
}


def build_android_package(
    model: nn.Module, input_shape: Sequence[int], *, num_classes: int | None = None
) -> dict[str, bytes]:
    """Build the files an Android app needs to run and train ``model`` on device.

    Parameters
    ----------
    model
        The torch model; it returns logits (class scores).
    input_shape
        One example's shape, without the batch axis (which is dynamic).
    num_classes
        The number of classes, checked against the model's output when given.

    Returns
    -------
    dict
        Bytes by file name: ``"inference.onnx"`` (ONNX inference graph),
        ``"training_model.onnx"``, ``"eval_model.onnx"``,
        ``"optimizer_model.onnx"``, ``"checkpoint"`` (ONNX Runtime training
        artifacts, plain SGD), ``"weights.safetensors"`` (the state dict)
        and ``"package.json"`` (the manifest; it lists the parameters in the
        order of ONNX Runtime's flat parameter buffer). ``ExportError`` if
        the model cannot be exported.
    """
    files = {INFERENCE_MODEL: export_onnx(model, input_shape)}
    files.update(export_training_artifacts(model, input_shape, optimizer="sgd"))
    weights = state_to_numpy(model)
    files[WEIGHTS] = encode_weights(weights)
    # Listed in ORT's flat-buffer order, so an app can also move all the
    # parameters as one vector; untrained tensors (buffers), if any, follow.
    order = parameter_order(files[TRAINING_MODEL])
    listed = {name: weights[name] for name in [*order, *(n for n in weights if n not in order)]}
    output_shape = _output_shape(files[INFERENCE_MODEL])
    if num_classes is not None and list(output_shape) != [num_classes]:
        raise ExportError(f"the model outputs shape {output_shape}, not [{num_classes}] classes")
    files[MANIFEST] = build_manifest(
        files, listed, input_shape=input_shape, output_shape=output_shape
    )
    return {name: files[name] for name in PACKAGE_FILES}


def android_artifacts(
    model: nn.Module, input_shape: Sequence[int], *, num_classes: int | None = None
) -> dict[str, tuple[bytes, str]]:
    """Return the Android package as model-version artifacts for ``ModelStore.publish``.

    Parameters
    ----------
    model
        The torch model; it returns logits.
    input_shape
        One example's shape, without the batch axis.
    num_classes
        The number of classes, checked against the model's output when given.

    Returns
    -------
    dict
        ``"android/<file>" -> (bytes, media type)`` for every file of
        :func:`build_android_package`.
    """
    package = build_android_package(model, input_shape, num_classes=num_classes)
    return {ARTIFACT_PREFIX + name: (data, _MEDIA_TYPES[name]) for name, data in package.items()}


def _output_shape(inference_model: bytes) -> list[int | str]:
    """Return the inference graph's output shape without the batch axis."""
    ort = import_without_torch("onnxruntime")
    options = ort.SessionOptions()
    # Only the declared shape is read; ORT's advice about parameters being
    # graph inputs (export_onnx keeps them feedable on purpose) is noise here.
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(inference_model, options, providers=["CPUExecutionProvider"])
        shape = session.get_outputs()[0].shape
    except Exception as exc:  # ORT's errors derive from Exception only
        raise ExportError(f"the exported inference graph does not load: {exc}") from exc
    return [d if isinstance(d, int) else str(d) for d in shape[1:]]
