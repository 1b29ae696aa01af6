"""Packaging a model for Android, and the emulated Android device.

An Android app runs and trains a FedMQ model with ONNX Runtime alone: the
package holds the ONNX inference graph, ONNX Runtime's on-device training
artifacts, the weights and a manifest (see README.md). ``import
android_bridge`` does not import torch; building a package does.
"""

from __future__ import annotations

from android_bridge.device import android_trainers
from android_bridge.layout import (
    ARTIFACT_PREFIX,
    INFERENCE_MODEL,
    MANIFEST,
    PACKAGE_FILES,
    PLATFORM,
    TRAINING_FILES,
    WEIGHTS,
)
from android_bridge.manifest import MANIFEST_FORMAT_VERSION
from android_bridge.package import android_artifacts, build_android_package

__all__ = [
    "ARTIFACT_PREFIX",
    "INFERENCE_MODEL",
    "MANIFEST",
    "MANIFEST_FORMAT_VERSION",
    "PACKAGE_FILES",
    "PLATFORM",
    "TRAINING_FILES",
    "WEIGHTS",
    "android_artifacts",
    "android_trainers",
    "build_android_package",
]
