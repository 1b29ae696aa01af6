"""Models and their versions: the zoo, exports, and a content-addressed store.

``import model_store`` does not import torch; torch is loaded when a model
is built or exported.
"""

from __future__ import annotations

from model_store.artifacts import (
    MEDIA_ONNX,
    MEDIA_SAFETENSORS,
    MEDIA_TORCHSCRIPT,
    ONNX,
    TORCHSCRIPT,
    WEIGHTS,
    build_initial_artifacts,
    decode_weights,
    encode_weights,
    state_to_numpy,
)
from model_store.errors import (
    ArtifactNotFound,
    ExportError,
    IntegrityError,
    ManifestError,
    ModelSpecError,
    StoreError,
    StoreUnavailable,
)
from model_store.export import (
    ONNX_OPSET,
    export_onnx,
    export_torchscript,
    export_torchscript_lite,
    export_torchscript_lite_functional,
)
from model_store.local import LocalStore
from model_store.manifest import Artifact, Manifest
from model_store.memory import MemoryStore
from model_store.s3 import S3Store
from model_store.store import STORE_ALIASES, ModelStore, PresignedAccess, StoreBase, open_store
from model_store.zoo import ZOO_NAMES, ModelSpec, build_model

__all__ = [
    "MEDIA_ONNX",
    "MEDIA_SAFETENSORS",
    "MEDIA_TORCHSCRIPT",
    "ONNX",
    "ONNX_OPSET",
    "STORE_ALIASES",
    "TORCHSCRIPT",
    "WEIGHTS",
    "ZOO_NAMES",
    "Artifact",
    "ArtifactNotFound",
    "ExportError",
    "IntegrityError",
    "LocalStore",
    "Manifest",
    "ManifestError",
    "MemoryStore",
    "ModelSpec",
    "ModelSpecError",
    "ModelStore",
    "PresignedAccess",
    "S3Store",
    "StoreBase",
    "StoreError",
    "StoreUnavailable",
    "build_initial_artifacts",
    "build_model",
    "decode_weights",
    "encode_weights",
    "export_onnx",
    "export_torchscript",
    "export_torchscript_lite",
    "export_torchscript_lite_functional",
    "open_store",
    "state_to_numpy",
]
