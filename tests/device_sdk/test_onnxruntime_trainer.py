"""The ONNX Runtime trainer: trains as the TorchScript trainer does; refuses what SGD cannot."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker import ModelRef, TrainTask
from device_sdk import ArtifactFetcher, DeviceContext, TaskError, TrainingError
from device_sdk.data import load_dataset
from device_sdk.trainers import TorchScriptTrainer
from device_sdk.trainers.onnxruntime import TRAINING_FILES, OrtSessionCache, OrtTrainer
from model_store import ModelSpec, build_model, export_torchscript, state_to_numpy
from model_store.export import TRAINING_FILES as EXPORTED_FILES
from model_store.export import export_training_artifacts

PREFIX = "android/"
SETTINGS = {"epochs": 2, "batch_size": 32, "optimizer": "sgd", "lr": 0.1}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An mlp for the digits, its TorchScript module and ORT artifacts, served by file URL."""
    folder = tmp_path_factory.mktemp("artifacts")
    spec = ModelSpec.from_config(
        {"zoo": "mlp", "input_shape": [64], "num_classes": 10, "hidden": [16]}
    )
    model = build_model(spec, seed=0)
    files = {"model.torchscript.pt": export_torchscript(model)}
    training = export_training_artifacts(model, spec.input_shape)
    files.update({PREFIX + name: data for name, data in training.items()})
    refs = {name: _ref(folder, data) for name, data in files.items()}
    data = load_dataset("digits")
    return {
        "refs": refs,
        "weights": state_to_numpy(model),
        "x": data.x_train[:240],
        "y": data.y_train[:240],
    }


def _ref(folder: Path, data: bytes) -> ModelRef:
    sha = hashlib.sha256(data).hexdigest()
    path = folder / sha
    path.write_bytes(data)
    return ModelRef(path.as_uri(), sha, len(data))


def _task(model_files: dict[str, Any], **training: Any) -> TrainTask:
    refs = model_files["refs"]
    return TrainTask(
        experiment_id="e",
        round=3,
        base_version=0,
        model=refs["model.torchscript.pt"],
        artifacts=refs,
        training=training,
    )


def _ctx(model_files: dict[str, Any], device: str = "dev-1") -> DeviceContext:
    weights = {k: v.copy() for k, v in model_files["weights"].items()}
    return DeviceContext(device, weights, model_files["refs"], ArtifactFetcher())


def _max_diff(a: Any, b: Any) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_the_device_copy_of_the_file_names_matches_the_exporter() -> None:
    assert TRAINING_FILES == EXPORTED_FILES


def test_ort_training_matches_the_torchscript_trainer_and_lowers_the_loss(
    model_files: dict[str, Any],
) -> None:
    x, y = model_files["x"], model_files["y"]
    task = _task(model_files, **SETTINGS)

    ort = OrtTrainer(x, y, seed=1, stream=0, prefix=PREFIX)(task, _ctx(model_files))
    ts = TorchScriptTrainer(x, y, seed=1, stream=0)(task, _ctx(model_files))

    assert set(ort.weights) == set(model_files["weights"])
    assert all(w.dtype == np.float32 for w in ort.weights.values())
    assert ort.num_examples == ts.num_examples == 240
    assert ort.metrics["local_steps"] == ts.metrics["local_steps"] == 2 * 8
    assert ort.metrics["loss"] < ort.metrics["loss_before"]
    assert ort.metrics["loss_before"] == pytest.approx(ts.metrics["loss_before"], abs=1e-5)
    assert ort.metrics["loss"] == pytest.approx(ts.metrics["loss"], abs=1e-5)
    # Measured: max |w_ort - w_torchscript| = 3.0e-8 after 16 steps (5 epochs of all
    # 1,437 digits, 225 steps: 7.5e-8).
    assert _max_diff(ort.weights, ts.weights) <= 1e-6
    # The batch order matters: another seed gives different weights.
    other = OrtTrainer(x, y, seed=2, stream=0, prefix=PREFIX)(task, _ctx(model_files))
    assert _max_diff(other.weights, ort.weights) > 1e-4


def test_a_shared_session_carries_nothing_from_one_task_or_device_to_the_next(
    model_files: dict[str, Any],
) -> None:
    x, y = model_files["x"], model_files["y"]
    sessions = OrtSessionCache()
    first = OrtTrainer(x, y, seed=1, stream=0, sessions=sessions)
    other = OrtTrainer(x[:100], y[:100], seed=5, stream=1, sessions=sessions)
    task = _task(model_files, **SETTINGS)

    before = first(task, _ctx(model_files))
    other(_task(model_files, epochs=1, lr=0.5), _ctx(model_files, "dev-2"))
    after = first(task, _ctx(model_files))

    assert _max_diff(before.weights, after.weights) == 0.0
    assert before.metrics == after.metrics


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("optimizer", "adam"),
        ("momentum", 0.9),
        ("weight_decay", 1e-4),
        ("proximal_mu", 0.1),
        ("scaffold", True),
    ],
)
def test_settings_plain_sgd_cannot_honour_are_refused_by_name(
    model_files: dict[str, Any], setting: str, value: Any
) -> None:
    trainer = OrtTrainer(model_files["x"], model_files["y"])

    with pytest.raises(TaskError, match=f"training.{setting}"):
        trainer(_task(model_files, **{**SETTINGS, setting: value}), _ctx(model_files))


def test_weights_that_do_not_fit_the_checkpoint_are_refused(model_files: dict[str, Any]) -> None:
    ctx = _ctx(model_files)
    ctx.weights["fc1.weight"] = np.zeros((3, 3), dtype=np.float32)

    with pytest.raises(TaskError, match="fc1.weight"):
        OrtTrainer(model_files["x"], model_files["y"])(_task(model_files, **SETTINGS), ctx)


def test_divergence_is_a_training_error(model_files: dict[str, Any]) -> None:
    trainer = OrtTrainer(model_files["x"], model_files["y"])

    with pytest.raises(TrainingError, match="diverged"):
        trainer(_task(model_files, **{**SETTINGS, "lr": 1e30}), _ctx(model_files))


def test_artifacts_with_another_optimizer_are_refused(
    model_files: dict[str, Any], tmp_path: Path
) -> None:
    model = build_model(ModelSpec("mlp", (64,), 10, hidden=(16,)), seed=0)
    adamw = export_training_artifacts(model, (64,), optimizer="adamw")
    refs = {
        **model_files["refs"],
        PREFIX + "optimizer_model.onnx": _ref(tmp_path, adamw["optimizer_model.onnx"]),
    }
    task = TrainTask(
        experiment_id="e",
        round=1,
        base_version=0,
        model=refs[PREFIX + "checkpoint"],
        artifacts=refs,
        training=SETTINGS,
    )
    ctx = DeviceContext("dev-1", dict(model_files["weights"]), refs, ArtifactFetcher())

    with pytest.raises(TaskError, match="plain SGD"):
        OrtTrainer(model_files["x"], model_files["y"])(task, ctx)
