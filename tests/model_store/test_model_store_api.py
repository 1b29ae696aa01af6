"""The public surface of model_store, and that importing it stays torch-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import model_store

EXPECTED = {
    "PresignedAccess",
    "S3Store",
    "StoreUnavailable",
    "export_torchscript_lite_functional",
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
    "StoreBase",
    "StoreError",
    "build_initial_artifacts",
    "build_model",
    "decode_weights",
    "encode_weights",
    "export_onnx",
    "export_torchscript",
    "export_torchscript_lite",
    "open_store",
    "state_to_numpy",
}


def test_all_lists_exactly_the_public_api() -> None:
    assert set(model_store.__all__) == EXPECTED
    assert all(hasattr(model_store, name) for name in model_store.__all__)


def test_error_tree_has_one_root() -> None:
    errors = [
        model_store.ArtifactNotFound,
        model_store.IntegrityError,
        model_store.ManifestError,
        model_store.ModelSpecError,
        model_store.ExportError,
    ]

    assert all(issubclass(e, model_store.StoreError) for e in errors)


def test_import_does_not_load_torch_or_onnx() -> None:
    # Prepare: a spec and a store are used too, since both must stay torch-free.
    code = (
        "import sys, model_store\n"
        "model_store.ModelSpec.from_config({'zoo': 'mlp', 'input_shape': [4], 'num_classes': 2})\n"
        "model_store.open_store('memory://').put_blob(b'x')\n"
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))\n"
    )

    # Execute
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(model_store.__file__).parents[1],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )

    # Assert
    assert result.stdout.strip() == "[]"
