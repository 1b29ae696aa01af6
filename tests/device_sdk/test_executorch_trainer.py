"""The ExecuTorch trainer: an emulated phone trains as the TorchScript trainer does."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from android_bridge import build_android_package
from broker import ModelRef, TrainTask, encode_weights
from device_sdk import ArtifactFetcher, DeviceContext, TaskError
from device_sdk.trainers import executorch as trainer_module
from device_sdk.trainers.executorch import EXECUTORCH_ARTIFACTS, ExecuTorchTrainer, ProgramFiles
from device_sdk.trainers.scaffold import STATE_ARTIFACT
from device_sdk.trainers.torchscript import TorchScriptTrainer
from model_store import LocalStore, ModelSpec, build_model, state_to_numpy
from model_store.export import export_torchscript
from model_store.export.executorch import EXECUTORCH_FILES, KEY_PREFIX
from model_store.export.mobile import MANIFEST
from model_store.ptd import rewrite_weights

SPEC = ModelSpec("mlp", (8,), 3, hidden=(16,))
MAX_BATCH = 32
SETTINGS = {"epochs": 2, "batch_size": 16, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> LocalStore:
    return LocalStore(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def package(store: LocalStore) -> dict[str, bytes]:
    return build_android_package(build_model(SPEC, seed=0), SPEC.input_shape, max_batch=MAX_BATCH)


def _ref(store: LocalStore, data: bytes) -> ModelRef:
    sha = store.put_blob(data)
    return ModelRef(store.blob_url(sha), sha, len(data))


def _later_version(store: LocalStore, package: dict[str, bytes]) -> tuple[Any, dict[str, Any]]:
    """Return a later version's weights and the task artifacts a device gets for it."""
    model = build_model(SPEC, seed=1)
    weights = state_to_numpy(model)
    refs = {"android/" + name: _ref(store, data) for name, data in package.items()}
    ptd = rewrite_weights(package["weights.ptd"], weights, key_prefix=KEY_PREFIX)
    refs["android/weights.ptd"] = _ref(store, ptd)
    refs["model.torchscript.pt"] = _ref(store, export_torchscript(model))
    return weights, refs


def _task(refs: dict[str, Any], **training: Any) -> TrainTask:
    return TrainTask(
        experiment_id="e",
        round=3,
        base_version=2,
        model=refs["android/weights.safetensors"],
        artifacts=refs,
        training={**SETTINGS, **training},
    )


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)


def _context(device: str, weights: dict[str, np.ndarray], refs: dict[str, Any]) -> DeviceContext:
    return DeviceContext(device, {k: v.copy() for k, v in weights.items()}, refs, ArtifactFetcher())


@pytest.mark.parametrize(
    "training",
    [{}, {"proximal_mu": 0.5}, {"scaffold": True}],
    ids=["sgd-momentum-decay", "fedprox", "scaffold"],
)
def test_an_executorch_phones_update_equals_the_torchscript_trainers(
    store: LocalStore, package: dict[str, bytes], training: dict[str, Any]
) -> None:
    # Prepare: a later version than the exported one, so the round's own weights file is
    # used; SCAFFOLD's server control variate rides along as the strategy state.
    weights, refs = _later_version(store, package)
    rng = np.random.default_rng(3)
    control = {
        f"control/{k}": rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in weights.items()
    }
    refs[STATE_ARTIFACT] = _ref(store, encode_weights(control))
    x, y = _data()
    phone, python = (
        ExecuTorchTrainer(x, y, seed=4, stream=2),
        TorchScriptTrainer(x, y, seed=4, stream=2),
    )

    # Execute: two rounds of the same task, data, seed and stream on both trainers
    # (SCAFFOLD's device control variate carries from one to the next).
    for _ in range(2):
        on_phone = phone(_task(refs, **training), _context("a", weights, refs))
        in_python = python(_task(refs, **training), _context("p", weights, refs))

    # Assert: measured max |diff| after the second round's 6 steps with momentum:
    # 6e-8 (SGD), 3e-8 (FedProx), 3.6e-7 (SCAFFOLD, control deltas included).
    assert set(on_phone.weights) == set(in_python.weights)
    assert set(weights) <= set(on_phone.weights)
    for name, expected in in_python.weights.items():
        np.testing.assert_allclose(on_phone.weights[name], expected, atol=1e-5, rtol=0)
    assert on_phone.num_examples == in_python.num_examples == 40
    assert on_phone.metrics["local_steps"] == in_python.metrics["local_steps"] == 2 * 3
    assert on_phone.metrics["loss"] == pytest.approx(in_python.metrics["loss"], abs=1e-5)
    assert on_phone.metrics["loss_before"] == pytest.approx(
        in_python.metrics["loss_before"], abs=1e-5
    )
    assert any(not np.allclose(on_phone.weights[k], weights[k]) for k in weights)
    assert ("control_delta/fc1.weight" in on_phone.weights) == bool(training.get("scaffold"))


def test_training_leaves_the_shared_weights_file_as_it_was(
    store: LocalStore, package: dict[str, bytes]
) -> None:
    weights, refs = _later_version(store, package)
    x, y = _data()
    files = ProgramFiles()
    trainer = ExecuTorchTrainer(x, y, files=files)
    ptd = ArtifactFetcher().fetch(refs["android/weights.ptd"])

    first = trainer(_task(refs), _context("a", weights, refs))
    second = trainer(_task(refs), _context("a", weights, refs))

    # The fleet's devices load one file per round: training must not write into it.
    assert files.weights(ptd).read_bytes() == ptd
    for name in weights:
        np.testing.assert_array_equal(first.weights[name], second.weights[name])


def test_devices_of_one_process_enter_the_runtime_one_at_a_time(
    store: LocalStore, package: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The runtime's first call sets up its thread pool under a static guard and logs
    # through Python's stdout: two threads inside it at once deadlocked a fleet's
    # first round. Every use of the runtime (evaluation, training) is counted.
    weights, refs = _later_version(store, package)
    x, y = _data()
    count = threading.Lock()
    inside, most = [0], [0]

    def counted(method: Any) -> Any:
        def run(*args: Any) -> Any:
            with count:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.02)  # give another thread the chance to come in
            try:
                return method(*args)
            finally:
                with count:
                    inside[0] -= 1

        return run

    for name in ("_mean_loss", "_train"):
        monkeypatch.setattr(ExecuTorchTrainer, name, counted(getattr(ExecuTorchTrainer, name)))
    files = ProgramFiles()

    def train(i: int) -> None:
        ExecuTorchTrainer(x, y, stream=i, files=files)(_task(refs), _context("a", weights, refs))

    threads = [threading.Thread(target=train, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert not any(thread.is_alive() for thread in threads)
    assert most[0] == 1


@pytest.mark.parametrize(
    ("training", "refusal"),
    [
        ({"optimizer": "adam"}, "offers SGD only"),
        ({"proximal_mu": -0.1}, "bad training settings"),
        ({"batch_size": MAX_BATCH + 1}, "largest batch"),
        ({"lr": -1.0}, "bad training settings"),
    ],
)
def test_settings_the_program_cannot_honour_are_refused_by_name(
    store: LocalStore, package: dict[str, bytes], training: dict[str, Any], refusal: str
) -> None:
    weights, refs = _later_version(store, package)
    x, y = _data()

    with pytest.raises(TaskError, match=refusal):
        ExecuTorchTrainer(x, y)(_task(refs, **training), _context("a", weights, refs))


def test_a_weights_file_of_another_version_is_refused(
    store: LocalStore, package: dict[str, bytes]
) -> None:
    weights, refs = _later_version(store, package)
    refs["android/weights.ptd"] = _ref(store, package["weights.ptd"])  # version 0's
    x, y = _data()

    with pytest.raises(TaskError, match="weights file of another version"):
        ExecuTorchTrainer(x, y)(_task(refs), _context("a", weights, refs))


def test_a_task_without_the_programs_is_refused(
    store: LocalStore, package: dict[str, bytes]
) -> None:
    weights, refs = _later_version(store, package)
    del refs["android/training.pte"]
    x, y = _data()

    with pytest.raises(TaskError, match="android/training.pte"):
        ExecuTorchTrainer(x, y)(_task(refs), _context("a", weights, refs))


def test_the_device_side_names_equal_the_exporters() -> None:
    # device_sdk may not import model_store, so it repeats the names.
    assert (*EXECUTORCH_FILES, MANIFEST) == EXECUTORCH_ARTIFACTS
    assert trainer_module.KEY_PREFIX == KEY_PREFIX
