"""Packaging a model for Android, and the emulated Android device.

An Android app trains a FedMQ model with ExecuTorch's training runtime: the
package holds the training and inference programs and their weights file,
ONNX Runtime's training artifacts as a legacy format, the weights and a
manifest (see README.md). ``import android_bridge`` does not import torch;
building a package, or training on ExecuTorch, does.
"""

from __future__ import annotations

from android_bridge.device import android_ort_trainers, android_trainers
from android_bridge.layout import (
    ARTIFACT_PREFIX,
    INFERENCE_MODEL,
    INFERENCE_PROGRAM,
    MANIFEST,
    PACKAGE_FILES,
    PLATFORM,
    PTD_WEIGHTS,
    TRAINING_FILES,
    TRAINING_PROGRAM,
    WEIGHTS,
)
from android_bridge.package import android_artifacts, build_android_package
from model_store.export.mobile import MANIFEST_FORMAT_VERSION

__all__ = [
    "ARTIFACT_PREFIX",
    "INFERENCE_MODEL",
    "INFERENCE_PROGRAM",
    "MANIFEST",
    "MANIFEST_FORMAT_VERSION",
    "PACKAGE_FILES",
    "PLATFORM",
    "PTD_WEIGHTS",
    "TRAINING_FILES",
    "TRAINING_PROGRAM",
    "WEIGHTS",
    "android_artifacts",
    "android_ort_trainers",
    "android_trainers",
    "build_android_package",
]
