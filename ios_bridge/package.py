"""Build the iOS package of a torch model: ExecuTorch programs, legacy ORT files, manifest."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from model_store.export.executorch import DEFAULT_MAX_BATCH
from model_store.export.mobile import build_mobile_package, mobile_artifacts, package_files

if TYPE_CHECKING:
    from torch import nn

__all__ = ["IOS_FILES", "IOS_PREFIX", "PLATFORM", "build_ios_package", "ios_artifacts"]

PLATFORM = "ios"
IOS_PREFIX = f"{PLATFORM}/"
"""Prefix of the package's files among a model version's artifacts."""

IOS_FILES = package_files(PLATFORM)
"""Every file of an iOS package: ExecuTorch's, ONNX Runtime's (legacy), weights, manifest."""


def build_ios_package(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    num_classes: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> dict[str, bytes]:
    """Build the files an iOS app needs to evaluate and train ``model``.

    The ExecuTorch programs run on the same C++ runtime an iOS app links
    (``executorch::extension::training``); the ONNX Runtime training files
    are the legacy format; ``weights.safetensors`` holds the initial weights
    and ``package.json`` describes everything, with checksums.

    Parameters
    ----------
    model
        A torch classifier whose forward returns logits ``(batch, classes)``.
    input_shape
        One example's shape, without the batch axis.
    num_classes
        The number of classes; checked against the model's output when given.
    max_batch
        The largest batch the ExecuTorch programs take.

    Returns
    -------
    dict
        ``name -> bytes`` for every name in :data:`IOS_FILES`; ``ExportError``
        when the model cannot be exported.
    """
    return build_mobile_package(
        model, input_shape, PLATFORM, num_classes=num_classes, max_batch=max_batch
    )


def ios_artifacts(
    model: nn.Module, input_shape: Sequence[int], *, max_batch: int = DEFAULT_MAX_BATCH
) -> dict[str, tuple[bytes, str]]:
    """Return the iOS package as ``"ios/<file>" -> (bytes, media type)`` artifacts."""
    return mobile_artifacts(model, input_shape, PLATFORM, max_batch=max_batch)
