"""The iOS package: its files and manifest, and the emulated iOS device that uses them.

How the device trains is tested once for both phones in tests/device_sdk/test_executorch_trainer.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

import ios_bridge
from broker import decode_weights
from device_sdk.trainers.executorch import ExecuTorchTrainer
from ios_bridge import IOS_FILES, build_ios_package, ios_artifacts, ios_trainers
from model_store import ExportError, ModelSpec, build_model

SPEC = ModelSpec("mlp", (8,), 3, hidden=(16,))


@pytest.fixture(scope="module")
def package() -> dict[str, bytes]:
    return build_ios_package(build_model(SPEC, seed=0), SPEC.input_shape)


def test_the_package_holds_every_file_and_the_manifest_lists_their_checksums(
    package: dict[str, bytes],
) -> None:
    manifest = json.loads(package["package.json"])

    assert list(package) == list(IOS_FILES)
    assert manifest["platform"] == "ios"
    assert manifest["input"]["shape"] == ["batch", 8]
    assert manifest["output"]["shape"] == ["batch", 3]
    assert set(manifest["files"]) == set(IOS_FILES) - {"package.json"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256(package[name]).hexdigest()
        assert entry["size"] == len(package[name])


def test_the_manifest_lists_the_weights_and_how_to_drive_each_format(
    package: dict[str, bytes],
) -> None:
    manifest = json.loads(package["package.json"])
    weights = decode_weights(package["weights.safetensors"])

    listed = {p["name"]: p["shape"] for p in manifest["parameters"]}
    assert listed == {name: list(array.shape) for name, array in weights.items()}
    assert manifest["format_version"] == 2
    executorch = manifest["executorch"]
    assert executorch["status"] == "current"
    assert executorch["training_program"]["file"] == "training.pte"
    assert executorch["inference_program"]["file"] == "inference.pte"
    assert executorch["weights"] == {"file": "weights.ptd", "key_prefix": "net."}
    assert manifest["onnxruntime"]["status"] == "legacy"
    assert set(manifest["onnxruntime"]["files"]) == {
        "training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint",
    }  # fmt: skip
    formats = {name: entry["format"] for name, entry in manifest["files"].items()}
    assert formats["training.pte"] == formats["weights.ptd"] == "executorch"
    assert formats["checkpoint"] == "onnxruntime"
    assert "model.ptl" not in package  # ExecuTorch's inference program replaced it


def test_artifacts_are_prefixed_and_typed(package: dict[str, bytes]) -> None:
    artifacts = ios_artifacts(build_model(SPEC, seed=0), SPEC.input_shape)

    assert set(artifacts) == {"ios/" + name for name in IOS_FILES}
    assert artifacts["ios/weights.safetensors"][0] == package["weights.safetensors"]
    assert artifacts["ios/package.json"][1] == "application/json"
    assert artifacts["ios/training_model.onnx"][1] == "application/onnx"
    assert artifacts["ios/training.pte"][1] == "application/vnd.fedmq.executorch-program"
    assert artifacts["ios/weights.ptd"][1] == "application/vnd.fedmq.executorch-data"
    assert all(media for _, media in artifacts.values())


def test_a_wrong_num_classes_raises_export_error() -> None:
    with pytest.raises(ExportError, match="num_classes is 5"):
        build_ios_package(build_model(SPEC, seed=0), SPEC.input_shape, num_classes=5)


def test_the_fleet_factory_builds_executorch_trainers_on_the_ios_files() -> None:
    x = np.zeros((4, 8), dtype=np.float32)
    y = np.zeros(4, dtype=np.int64)

    trainer = ios_trainers(0)(x, y, 3)

    assert isinstance(trainer, ExecuTorchTrainer)
    assert trainer._prefix == "ios/"


def test_public_names_resolve_and_importing_the_bridge_loads_no_torch() -> None:
    assert len(set(ios_bridge.__all__)) == len(ios_bridge.__all__)
    for name in ios_bridge.__all__:
        assert hasattr(ios_bridge, name), name
    code = "import sys, ios_bridge; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
