"""The Android package: every file, a manifest that describes them, store-ready artifacts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnxruntime.training import api as ort_training

import android_bridge
from android_bridge import PACKAGE_FILES, android_artifacts, build_android_package
from broker import decode_weights
from model_store import MEDIA_ONNX, MEDIA_SAFETENSORS, ExportError, ModelSpec, build_model
from model_store.export import MEDIA_ORT_CHECKPOINT, export_training_artifacts, parameter_order
from model_store.export.ort_training import _loadable_by_ort

SPEC = ModelSpec("mlp", (64,), 10, hidden=(16,))


@pytest.fixture(scope="module")
def package() -> dict[str, bytes]:
    return build_android_package(build_model(SPEC, seed=0), SPEC.input_shape, num_classes=10)


def _manifest(package: dict[str, bytes]) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(package["package.json"])
    return document


def test_the_package_holds_the_graphs_training_artifacts_weights_and_manifest(
    package: dict[str, bytes],
) -> None:
    assert tuple(package) == PACKAGE_FILES
    assert set(PACKAGE_FILES) == {
        "training.pte",
        "inference.pte",
        "weights.ptd",
        "inference.onnx",
        "training_model.onnx",
        "eval_model.onnx",
        "optimizer_model.onnx",
        "checkpoint",
        "weights.safetensors",
        "package.json",
    }
    assert all(package[name] for name in PACKAGE_FILES)


def test_the_manifest_lists_every_parameter_of_the_weights_file_in_buffer_order(
    package: dict[str, bytes],
) -> None:
    manifest = _manifest(package)
    weights = decode_weights(package["weights.safetensors"])

    listed = [(p["name"], p["shape"], p["dtype"]) for p in manifest["parameters"]]

    names = [name for name, _, _ in listed]
    assert sorted(names) == sorted(weights) == sorted(build_model(SPEC, seed=0).state_dict())
    assert names == parameter_order(package["training_model.onnx"])
    assert listed == [(n, list(weights[n].shape), str(weights[n].dtype)) for n in names]


def test_the_manifest_gives_every_other_file_its_sha256_and_size(
    package: dict[str, bytes],
) -> None:
    files = _manifest(package)["files"]

    assert set(files) == set(PACKAGE_FILES) - {"package.json"}
    for name, entry in files.items():
        assert entry == {
            "format": "executorch" if name in ("training.pte", "inference.pte", "weights.ptd")
            else "safetensors" if name == "weights.safetensors"
            else "onnxruntime",
            "sha256": hashlib.sha256(package[name]).hexdigest(),
            "size": len(package[name]),
        }  # fmt: skip


def test_the_manifest_describes_the_tensors_the_app_feeds_and_reads(
    package: dict[str, bytes],
) -> None:
    manifest = _manifest(package)
    training = onnx.load_model_from_string(package["training_model.onnx"]).graph
    graph_inputs = [value.name for value in training.input]

    assert manifest["format_version"] == 2
    assert manifest["platform"] == "android"
    assert manifest["input"] == {"name": "input", "shape": ["batch", 64], "dtype": "float32"}
    assert manifest["output"] == {"name": "logits", "shape": ["batch", 10], "dtype": "float32"}
    assert manifest["labels"] == {
        "name": "labels",
        "shape": ["batch"],
        "dtype": "int64",
        "format": "class_index",
    }
    assert graph_inputs[:2] == [manifest["input"]["name"], manifest["labels"]["name"]]
    assert manifest["loss"] == "cross_entropy"
    assert manifest["onnxruntime"]["status"] == "legacy"
    assert manifest["onnxruntime"]["optimizer"] == {
        "name": "sgd",
        "learning_rate_from": "task.training.lr",
    }
    assert manifest["executorch"]["training_program"]["inputs"] == ["input", "labels"]
    assert manifest["executorch"]["training_program"]["outputs"] == ["loss", "logits"]


def test_artifacts_are_the_package_files_under_android_with_media_types(
    package: dict[str, bytes],
) -> None:
    artifacts = android_artifacts(build_model(SPEC, seed=0), SPEC.input_shape)

    assert set(artifacts) == {f"android/{name}" for name in PACKAGE_FILES}
    media = {name: media_type for name, (_, media_type) in artifacts.items()}
    assert media["android/inference.onnx"] == media["android/training_model.onnx"] == MEDIA_ONNX
    assert media["android/checkpoint"] == MEDIA_ORT_CHECKPOINT
    assert media["android/weights.safetensors"] == MEDIA_SAFETENSORS
    assert media["android/package.json"] == "application/json"
    # Same model, same seed: the deterministic files come out byte for byte.
    for name in ("inference.onnx", "weights.safetensors", "checkpoint"):
        assert artifacts[f"android/{name}"][0] == package[name]


def test_a_wrong_class_count_is_an_export_error() -> None:
    with pytest.raises(ExportError, match="3"):
        build_android_package(build_model(SPEC, seed=0), SPEC.input_shape, num_classes=3)


@pytest.mark.parametrize(
    ("option", "value"), [("loss", "mse"), ("optimizer", "lamb")], ids=["loss", "optimizer"]
)
def test_an_unsupported_loss_or_optimizer_is_an_export_error(option: str, value: str) -> None:
    with pytest.raises(ExportError, match=value):
        export_training_artifacts(build_model(SPEC, seed=0), SPEC.input_shape, **{option: value})


def test_graphs_stamped_with_a_newer_ir_version_are_rewritten_for_ort_1_19() -> None:
    graph = onnx.helper.make_graph([], "empty", [], [])
    newer = onnx.helper.make_model(graph)
    newer.ir_version = 11

    fixed = onnx.load_model_from_string(_loadable_by_ort(newer.SerializeToString()))

    assert fixed.ir_version == 10


def test_public_surface() -> None:
    for name in android_bridge.__all__:
        assert hasattr(android_bridge, name), name
    assert {"build_android_package", "android_artifacts", "android_trainers"} <= set(
        android_bridge.__all__
    )


def test_adamw_artifacts_are_generated_on_request_and_load_in_ort(tmp_path: Path) -> None:
    files = export_training_artifacts(
        build_model(SPEC, seed=0), SPEC.input_shape, optimizer="adamw"
    )
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    optimizer = onnx.load_model_from_string(files["optimizer_model.onnx"])

    state = ort_training.CheckpointState.load_checkpoint(str(tmp_path / "checkpoint"))
    module = ort_training.Module(str(tmp_path / "training_model.onnx"), state)
    ort_training.Optimizer(str(tmp_path / "optimizer_model.onnx"), module)

    assert [node.op_type for node in optimizer.graph.node] == ["AdamWOptimizer"]
    assert optimizer.ir_version <= 10
