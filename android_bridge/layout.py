"""The Android package's file names, and where its files sit among a model version's artifacts."""

from __future__ import annotations

from model_store.export.executorch import INFERENCE_PROGRAM, TRAINING_PROGRAM
from model_store.export.mobile import MANIFEST, MEDIA_MANIFEST, ORT_INFERENCE_MODEL, package_files
from model_store.export.ort_training import TRAINING_FILES
from model_store.ptd import PTD_WEIGHTS

__all__ = [
    "ARTIFACT_PREFIX",
    "INFERENCE_MODEL",
    "INFERENCE_PROGRAM",
    "MANIFEST",
    "MEDIA_MANIFEST",
    "PACKAGE_FILES",
    "PLATFORM",
    "PTD_WEIGHTS",
    "TRAINING_FILES",
    "TRAINING_PROGRAM",
    "WEIGHTS",
]

PLATFORM = "android"

#: A model version's artifacts name the package's files ``android/<file>``.
ARTIFACT_PREFIX = f"{PLATFORM}/"

#: ONNX Runtime Mobile's inference graph (legacy, with the ORT training files).
INFERENCE_MODEL = ORT_INFERENCE_MODEL
WEIGHTS = "weights.safetensors"
#: Every file of the package: the ExecuTorch programs and weights (current),
#: ONNX Runtime's inference graph and training artifacts (legacy), the
#: safetensors weights, and the manifest last (it lists the others' checksums).
PACKAGE_FILES = package_files(PLATFORM)
