"""Build the Android package of a torch model: ExecuTorch programs, legacy ORT files, manifest."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from android_bridge.layout import PLATFORM
from model_store.export.executorch import DEFAULT_MAX_BATCH
from model_store.export.mobile import build_mobile_package, mobile_artifacts

if TYPE_CHECKING:
    from torch import nn

__all__ = ["android_artifacts", "build_android_package"]


def build_android_package(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    num_classes: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> dict[str, bytes]:
    """Build the files an Android app needs to run and train ``model`` on device.

    Parameters
    ----------
    model
        The torch model; it returns logits (class scores).
    input_shape
        One example's shape, without the batch axis.
    num_classes
        The number of classes, checked against the model's output when given.
    max_batch
        The largest batch the ExecuTorch programs take.

    Returns
    -------
    dict
        Bytes by file name, in :data:`~android_bridge.layout.PACKAGE_FILES`
        order: ``training.pte``, ``inference.pte``, ``weights.ptd``
        (ExecuTorch), ``inference.onnx`` and ONNX Runtime's four training
        artifacts (legacy), ``weights.safetensors`` and ``package.json``.
        ``ExportError`` if the model cannot be exported.
    """
    return build_mobile_package(
        model, input_shape, PLATFORM, num_classes=num_classes, max_batch=max_batch
    )


def android_artifacts(
    model: nn.Module, input_shape: Sequence[int], *, max_batch: int = DEFAULT_MAX_BATCH
) -> dict[str, tuple[bytes, str]]:
    """Return the Android package as ``"android/<file>" -> (bytes, media type)`` artifacts."""
    return mobile_artifacts(model, input_shape, PLATFORM, max_batch=max_batch)
