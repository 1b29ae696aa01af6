"""Parity: the Android package's graphs compute what torch computes."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnxruntime.training import api as ort_training

from android_bridge import build_android_package
from model_store import ModelSpec, build_model, state_to_numpy

SPECS = {
    "mlp": ModelSpec("mlp", (64,), 10, hidden=(16,)),
    "mnist_cnn": ModelSpec("mnist_cnn", (1, 12, 12), 10),
}


@pytest.fixture(scope="module", params=sorted(SPECS))
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    spec = SPECS[request.param]
    package = build_android_package(build_model(spec, seed=0), spec.input_shape)
    folder = tmp_path_factory.mktemp(request.param)
    for name, data in package.items():
        (folder / name).write_bytes(data)
    return spec, package, folder


def _batch(spec: ModelSpec, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, *spec.input_shape), dtype=np.float32)
    return x, rng.integers(0, 10, size=n).astype(np.int64)


def test_inference_graph_matches_torch(built: Any) -> None:
    spec, package, _ = built
    options = ort.SessionOptions()
    options.log_severity_level = 3  # parameters are graph inputs on purpose
    session = ort.InferenceSession(package["inference.onnx"], options)
    model = build_model(spec, seed=0).eval()
    x, _ = _batch(spec)

    (logits,) = session.run(["logits"], {"input": x})
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()

    # Measured: max |diff| 1.2e-7 (mlp) and 1.1e-7 (mnist_cnn).
    assert np.abs(logits - expected).max() <= 1e-5


def test_one_sgd_step_matches_torch_sgd_from_the_same_weights(built: Any) -> None:
    spec, _, folder = built
    # Start from other weights than the checkpoint's: set by name, as a device does.
    model = build_model(spec, seed=1)
    start = state_to_numpy(model)
    x, y = _batch(spec)
    state = ort_training.CheckpointState.load_checkpoint(str(folder / "checkpoint"))
    module = ort_training.Module(
        str(folder / "training_model.onnx"), state, str(folder / "eval_model.onnx")
    )
    optimizer = ort_training.Optimizer(str(folder / "optimizer_model.onnx"), module)
    for name, value in start.items():
        state.parameters[name] = value
    optimizer.set_learning_rate(0.1)

    module.train()
    ort_loss = float(module(x, y))
    optimizer.step()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    torch_loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    torch_loss.backward()  # type: ignore[no-untyped-call]
    sgd.step()

    expected = state_to_numpy(model)
    diff = max(float(np.abs(state.parameters[n].data - expected[n]).max()) for n in expected)
    moved = max(float(np.abs(expected[n] - start[n]).max()) for n in expected)
    assert moved > 1e-3  # the step did something to compare
    # Measured: max |diff| 1.5e-8 for both mlp and mnist_cnn (steps of 0.04 and 0.015).
    assert diff <= 1e-5
    assert ort_loss == pytest.approx(float(torch_loss.detach()), abs=1e-5)


def test_the_flat_parameter_buffer_follows_the_manifest_order(built: Any) -> None:
    spec, package, folder = built
    weights = state_to_numpy(build_model(spec, seed=1))
    state = ort_training.CheckpointState.load_checkpoint(str(folder / "checkpoint"))
    module = ort_training.Module(str(folder / "training_model.onnx"), state)
    for name, value in weights.items():
        state.parameters[name] = value
    order = [p["name"] for p in json.loads(package["package.json"])["parameters"]]

    flat = module.get_contiguous_parameters(trainable_only=True).numpy()

    np.testing.assert_array_equal(flat, np.concatenate([weights[n].ravel() for n in order]))
