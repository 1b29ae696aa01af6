"""The iOS package: its files and manifest, and the emulated iOS device that uses them."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from torch.jit.mobile import _load_for_lite_interpreter

import ios_bridge
from broker import ModelRef, TrainTask, decode_weights
from device_sdk import ArtifactFetcher, DeviceContext, TaskError
from ios_bridge import IOS_FILES, IosTrainer, build_ios_package, ios_artifacts, ios_trainers
from model_store import ExportError, LocalStore, ModelSpec, build_model

SPEC = ModelSpec("mlp", (8,), 3, hidden=(16,))


@pytest.fixture(scope="module")
def package() -> dict[str, bytes]:
    return build_ios_package(build_model(SPEC, seed=0), SPEC.input_shape)


@pytest.fixture(scope="module")
def refs(package: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The package's files as a task's ``ios/...`` artifact references, from a real store."""
    store = LocalStore(tmp_path_factory.mktemp("store"))
    refs = {}
    for name, data in package.items():
        sha = store.put_blob(data)
        refs["ios/" + name] = ModelRef(store.blob_url(sha), sha, len(data))
    return refs


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
        assert entry == {
            "sha256": hashlib.sha256(package[name]).hexdigest(),
            "size": len(package[name]),
        }


def test_the_manifest_lists_the_weights_and_the_lite_modules_input_order(
    package: dict[str, bytes],
) -> None:
    manifest = json.loads(package["package.json"])
    weights = decode_weights(package["weights.safetensors"])

    listed = {p["name"]: p["shape"] for p in manifest["parameters"]}
    assert listed == {name: list(array.shape) for name, array in weights.items()}
    assert manifest["lite_module"]["file"] == "model.ptl"
    assert manifest["lite_module"]["inputs"] == ["input", *build_model(SPEC, seed=0).state_dict()]


def test_the_lite_module_evaluates_the_packaged_weights_like_torch(
    package: dict[str, bytes],
) -> None:
    manifest = json.loads(package["package.json"])
    weights = decode_weights(package["weights.safetensors"])
    lite = _load_for_lite_interpreter(io.BytesIO(package["model.ptl"]))
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))

    inputs = [torch.tensor(weights[n]) for n in manifest["lite_module"]["inputs"][1:]]
    with torch.no_grad():
        np.testing.assert_allclose(
            lite(x, *inputs).numpy(), build_model(SPEC, seed=0).eval()(x).numpy(), atol=1e-6
        )


def test_artifacts_are_prefixed_and_typed(package: dict[str, bytes]) -> None:
    artifacts = ios_artifacts(build_model(SPEC, seed=0), SPEC.input_shape)

    assert set(artifacts) == {"ios/" + name for name in IOS_FILES}
    assert artifacts["ios/weights.safetensors"][0] == package["weights.safetensors"]
    assert artifacts["ios/package.json"][1] == "application/json"
    assert artifacts["ios/training_model.onnx"][1] == "application/onnx"
    assert all(media for _, media in artifacts.values())


def test_a_wrong_num_classes_raises_export_error() -> None:
    with pytest.raises(ExportError, match="num_classes is 5"):
        build_ios_package(build_model(SPEC, seed=0), SPEC.input_shape, num_classes=5)


def _task_and_context(refs: dict[str, Any], weights: dict[str, np.ndarray]) -> Any:
    task = TrainTask(
        experiment_id="e",
        round=1,
        base_version=0,
        model=refs["ios/weights.safetensors"],
        artifacts=refs,
        training={"epochs": 2, "batch_size": 16, "lr": 0.1},
    )
    ctx = DeviceContext("ios-1", {k: v.copy() for k, v in weights.items()}, refs, ArtifactFetcher())
    return task, ctx


def _device_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)


def test_the_ios_device_evaluates_with_the_lite_module_and_trains_with_ort(
    refs: dict[str, Any],
) -> None:
    # Prepare: global weights other than the packaged ones, as in a later round.
    global_model = build_model(SPEC, seed=1).eval()
    weights = {k: v.detach().numpy().copy() for k, v in global_model.state_dict().items()}
    x, y = _device_data()
    task, ctx = _task_and_context(refs, weights)

    # Execute
    result = IosTrainer(x, y, seed=0, stream=0)(task, ctx)

    # Assert: loss_before and accuracy_before are the global model's, as torch computes them.
    with torch.no_grad():
        logits = global_model(torch.from_numpy(x))
        expected_loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)))
        expected_accuracy = float((logits.argmax(1).numpy() == y).mean())
    assert abs(result.metrics["loss_before"] - expected_loss) <= 1e-5
    assert result.metrics["accuracy_before"] == pytest.approx(expected_accuracy, abs=1e-12)
    assert result.metrics["local_steps"] == 2 * 3  # ceil(40 / 16) batches per epoch
    assert result.metrics["loss"] < result.metrics["loss_before"]
    assert result.num_examples == 40
    assert set(result.weights) == set(weights)
    assert any(not np.allclose(result.weights[k], weights[k]) for k in weights)


def test_evaluation_needs_only_the_lite_module_and_the_manifest(refs: dict[str, Any]) -> None:
    global_model = build_model(SPEC, seed=2).eval()
    weights = {k: v.detach().numpy().copy() for k, v in global_model.state_dict().items()}
    lite_only = {k: refs[k] for k in ("ios/model.ptl", "ios/package.json")}
    x, y = _device_data()
    ctx = DeviceContext("ios-2", weights, lite_only, ArtifactFetcher())

    metrics = IosTrainer(x, y).evaluate(ctx)

    with torch.no_grad():
        logits = global_model(torch.from_numpy(x))
    expected = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)))
    assert abs(metrics["loss_before"] - expected) <= 1e-5
    assert metrics["accuracy_before"] == pytest.approx(
        float((logits.argmax(1).numpy() == y).mean())
    )


def test_a_task_without_the_ios_package_is_refused(refs: dict[str, Any]) -> None:
    x, y = _device_data()
    weights = {k: v.detach().numpy() for k, v in build_model(SPEC, seed=0).state_dict().items()}
    partial = {k: v for k, v in refs.items() if k != "ios/model.ptl"}
    task, ctx = _task_and_context(partial, weights)

    with pytest.raises(TaskError, match="ios/model.ptl"):
        IosTrainer(x, y)(task, ctx)


def test_the_fleet_factory_builds_ios_trainers() -> None:
    x, y = _device_data()

    assert isinstance(ios_trainers(0)(x, y, 3), IosTrainer)


def test_public_names_resolve_and_importing_the_bridge_loads_no_torch() -> None:
    assert len(set(ios_bridge.__all__)) == len(ios_bridge.__all__)
    for name in ios_bridge.__all__:
        assert hasattr(ios_bridge, name), name
    code = "import sys, ios_bridge; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
