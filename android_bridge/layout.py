"""The Android package's file names, and where its files sit among a model version's artifacts."""

from __future__ import annotations

from model_store.export import TRAINING_FILES

__all__ = [
    "ARTIFACT_PREFIX",
    "INFERENCE_MODEL",
    "MANIFEST",
    "MEDIA_MANIFEST",
    "PACKAGE_FILES",
    "PLATFORM",
    "TRAINING_FILES",
    "WEIGHTS",
]

PLATFORM = "android"

#: A model version's artifacts name the package's files ``android/<file>``.
ARTIFACT_PREFIX = f"{PLATFORM}/"

INFERENCE_MODEL = "inference.onnx"
WEIGHTS = "weights.safetensors"
MANIFEST = "package.json"
#: Every file of the package: inference graph, ONNX Runtime's four training
#: artifacts (loaded together by the app), weights, and the manifest last
#: (it lists the others' checksums).
PACKAGE_FILES = (INFERENCE_MODEL, *TRAINING_FILES, WEIGHTS, MANIFEST)

MEDIA_MANIFEST = "application/json"
