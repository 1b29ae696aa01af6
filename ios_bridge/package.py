"""Package a torch model for iOS: TorchScript lite, ONNX Runtime training files, manifest."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ios_bridge.manifest import package_manifest
from model_store.artifacts import MEDIA_ONNX, MEDIA_SAFETENSORS, encode_weights, state_to_numpy
from model_store.errors import ExportError
from model_store.export.ort_training import (
    MEDIA_ORT_CHECKPOINT,
    TRAINING_FILES,
    export_training_artifacts,
)
from model_store.export.torchscript import export_torchscript_lite_functional

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "IOS_FILES",
    "IOS_PREFIX",
    "LITE_MODULE",
    "MANIFEST",
    "MEDIA_JSON",
    "MEDIA_TORCHSCRIPT_LITE",
    "WEIGHTS",
    "build_ios_package",
    "ios_artifacts",
]

LITE_MODULE = "model.ptl"
WEIGHTS = "weights.safetensors"
MANIFEST = "package.json"
IOS_PREFIX = "ios/"
"""Prefix of the package's files among a model version's artifacts."""

IOS_FILES = (LITE_MODULE, *TRAINING_FILES, WEIGHTS, MANIFEST)
"""Every file of an iOS package."""

MEDIA_TORCHSCRIPT_LITE = "application/vnd.fedmq.torchscript-lite"
MEDIA_JSON = "application/json"


def build_ios_package(
    model: nn.Module, input_shape: Sequence[int], *, num_classes: int | None = None
) -> dict[str, bytes]:
    """Build the files an iOS app needs to evaluate and train ``model``.

    ``model.ptl`` evaluates with LibTorch-Lite and takes the weights as
    inputs, so the app evaluates every round's weights with the one module;
    the ONNX Runtime training files (ORT ships an iOS training build) train
    it; ``weights.safetensors`` holds the initial weights and
    ``package.json`` describes everything, with checksums.

    Parameters
    ----------
    model
        A torch classifier whose forward returns logits ``(batch, classes)``;
        its mode is restored after.
    input_shape
        One example's shape, without the batch axis.
    num_classes
        The number of classes; checked against the model's output (default:
        read from it).

    Returns
    -------
    dict
        ``name -> bytes`` for every name in :data:`IOS_FILES`; ``ExportError``
        when the model cannot be exported.
    """
    shape = tuple(input_shape)
    classes = _output_classes(model, shape, num_classes)
    lite, lite_inputs = export_torchscript_lite_functional(model, shape)
    weights = state_to_numpy(model)
    files = {LITE_MODULE: lite, **export_training_artifacts(model, shape)}
    files[WEIGHTS] = encode_weights(weights)
    files[MANIFEST] = package_manifest(
        files,
        weights=weights,
        input_shape=shape,
        num_classes=classes,
        lite_file=LITE_MODULE,
        lite_weight_inputs=lite_inputs,
    )
    return files


def ios_artifacts(model: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[bytes, str]]:
    """Return the iOS package as model-version artifacts named ``ios/<file>``.

    Parameters
    ----------
    model
        The torch classifier.
    input_shape
        One example's shape, without the batch axis.

    Returns
    -------
    dict
        ``"ios/<file>" -> (bytes, media type)``, ready for ``ModelStore.publish``.
    """
    return {
        IOS_PREFIX + name: (data, _media_type(name))
        for name, data in build_ios_package(model, input_shape).items()
    }


def _media_type(name: str) -> str:
    """Return the media type a package file is stored under."""
    if name.endswith(".onnx"):
        return MEDIA_ONNX
    return {
        LITE_MODULE: MEDIA_TORCHSCRIPT_LITE,
        WEIGHTS: MEDIA_SAFETENSORS,
        MANIFEST: MEDIA_JSON,
    }.get(name, MEDIA_ORT_CHECKPOINT)


def _output_classes(model: nn.Module, shape: tuple[int, ...], expected: int | None) -> int:
    """Return the width of the model's logits, checked against ``expected``."""
    import torch

    if not shape or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ExportError(f"input_shape must be positive integers, got {list(shape)}")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros((1, *shape), dtype=torch.float32))
    except Exception as exc:  # the user's forward can raise anything; translate it
        raise ExportError(
            f"{type(model).__name__} does not run on input shape {list(shape)}: {exc}"
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ExportError(
            f"{type(model).__name__} must return logits of shape (batch, classes), got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
        )
    classes = int(out.shape[1])
    if expected is not None and expected != classes:
        raise ExportError(f"num_classes is {expected} but the model outputs {classes} logits")
    return classes
