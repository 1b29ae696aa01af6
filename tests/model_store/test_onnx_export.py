"""ONNX export: the evaluator feeds new weights by name into one session."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from model_store import ExportError, ModelSpec, build_model, export_onnx, state_to_numpy


def _session(data: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # ORT warns once per initializer that is also an input; that is the point.
    options.log_severity_level = 3
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    "spec",
    [ModelSpec("mlp", (64,), 10, hidden=(32, 16)), ModelSpec("mnist_cnn", (1, 28, 28), 10)],
    ids=["mlp", "mnist_cnn"],
)
def test_fed_weights_match_torch_with_those_weights(spec: ModelSpec) -> None:
    # Prepare: export once with seed 0, then bring weights from seed 1.
    session = _session(export_onnx(build_model(spec, seed=0), spec.input_shape))
    other = build_model(spec, seed=1).eval()
    new_weights = state_to_numpy(other)
    x = np.random.default_rng(0).standard_normal((4, *spec.input_shape), dtype=np.float32)

    # Execute
    (logits,) = session.run(["logits"], {"input": x, **new_weights})

    # Assert
    with torch.no_grad():
        expected = other(torch.from_numpy(x)).numpy()
    assert np.abs(logits - expected).max() <= 1e-5
    # and the feeds really mattered: the exported seed-0 weights differ.
    (baked,) = session.run(["logits"], {"input": x})
    assert np.abs(baked - expected).max() > 1e-3


def test_every_state_dict_name_is_an_initializer_and_an_input() -> None:
    spec = ModelSpec("mnist_cnn", (1, 28, 28), 10)
    model = build_model(spec, seed=0)

    graph = onnx.load_model_from_string(export_onnx(model, spec.input_shape)).graph

    names = list(model.state_dict())
    assert [t.name for t in graph.initializer] == names
    assert [i.name for i in graph.input] == ["input", *names]
    assert [o.name for o in graph.output] == ["logits"]


def test_equal_valued_parameters_keep_separate_names() -> None:
    # Two all-zero biases: an exporter that deduplicates initializers by value
    # would merge them, and feeding one name would set both.
    fc1, fc2 = nn.Linear(4, 4), nn.Linear(4, 4)
    nn.init.zeros_(fc1.bias)
    nn.init.zeros_(fc2.bias)
    model = nn.Sequential(OrderedDict(fc1=fc1, relu=nn.ReLU(), fc2=fc2))
    session = _session(export_onnx(model, (4,)))
    weights = state_to_numpy(model)
    weights["fc2.bias"] = np.full(4, 2.0, dtype=np.float32)
    x = np.ones((1, 4), dtype=np.float32)

    (logits,) = session.run(None, {"input": x, **weights})

    fc2.bias.data.fill_(2.0)
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(torch.from_numpy(x)).numpy(), atol=1e-6)


def test_batch_axis_is_dynamic() -> None:
    spec = ModelSpec("logreg", (8, 8), 10)
    session = _session(export_onnx(build_model(spec, seed=0), spec.input_shape))

    for batch in (1, 17):
        (logits,) = session.run(None, {"input": np.zeros((batch, 8, 8), np.float32)})
        assert logits.shape == (batch, 10)


def test_export_restores_training_mode_and_is_quiet() -> None:
    spec = ModelSpec("mlp", (64,), 10)
    model = build_model(spec, seed=0).train()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(model, spec.input_shape)

    assert model.training
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning | FutureWarning)]


class _Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("cannot trace this")


def test_torch_errors_become_export_error() -> None:
    with pytest.raises(ExportError, match="cannot trace this"):
        export_onnx(_Broken(), (3,))
