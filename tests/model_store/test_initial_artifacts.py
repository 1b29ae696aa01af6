"""Weights encoding and the version-0 artifacts of a zoo model."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch

from model_store import (
    MEDIA_ONNX,
    MEDIA_SAFETENSORS,
    MEDIA_TORCHSCRIPT,
    ONNX,
    TORCHSCRIPT,
    WEIGHTS,
    MemoryStore,
    ModelSpec,
    StoreError,
    build_initial_artifacts,
    build_model,
    decode_weights,
    encode_weights,
    state_to_numpy,
)

SPEC = ModelSpec("mlp", (64,), 10, hidden=(16,))


def test_state_to_numpy_copies_float32_contiguous_in_order() -> None:
    model = build_model(SPEC, seed=0)

    weights = state_to_numpy(model)
    weights["fc1.bias"][:] = 42.0

    assert list(weights) == list(model.state_dict())
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in weights.values())
    assert not torch.any(model.state_dict()["fc1.bias"] == 42.0)


def test_encode_decode_round_trip_accepts_non_contiguous_arrays() -> None:
    weights = {"w": np.arange(12, dtype=np.float32).reshape(3, 4).T, "b": np.ones(3, np.float32)}

    decoded = decode_weights(encode_weights(weights))

    assert set(decoded) == {"w", "b"}
    np.testing.assert_array_equal(decoded["w"], weights["w"])


def test_decode_garbage_raises_store_error() -> None:
    with pytest.raises(StoreError):
        decode_weights(b"\x00" * 3)


def test_initial_artifacts_and_metadata() -> None:
    # Execute
    artifacts, metadata = build_initial_artifacts(SPEC, seed=5)

    # Assert
    assert {name: media for name, (_, media) in artifacts.items()} == {
        WEIGHTS: MEDIA_SAFETENSORS,
        ONNX: MEDIA_ONNX,
        TORCHSCRIPT: MEDIA_TORCHSCRIPT,
    }
    expected = state_to_numpy(build_model(SPEC, seed=5))
    weights = decode_weights(artifacts[WEIGHTS][0])
    assert all(np.array_equal(weights[k], expected[k]) for k in expected)
    assert metadata["spec"] == SPEC.to_config()
    assert metadata["parameters"] == {
        "fc1.weight": {"shape": [16, 64], "dtype": "float32"},
        "fc1.bias": {"shape": [16], "dtype": "float32"},
        "fc2.weight": {"shape": [10, 16], "dtype": "float32"},
        "fc2.bias": {"shape": [10], "dtype": "float32"},
    }
    assert metadata["num_parameters"] == 64 * 16 + 16 + 16 * 10 + 10
    assert (metadata["input_name"], metadata["output_name"]) == ("input", "logits")
    graph = onnx.load_model_from_string(artifacts[ONNX][0]).graph
    assert {i.name for i in graph.input} == {"input", *metadata["parameters"]}
    torch.jit.load(io.BytesIO(artifacts[TORCHSCRIPT][0]))


def test_weights_and_onnx_bytes_are_reproducible_for_a_seed() -> None:
    first, _ = build_initial_artifacts(SPEC, seed=5)
    second, _ = build_initial_artifacts(SPEC, seed=5)
    other, _ = build_initial_artifacts(SPEC, seed=6)

    assert first[WEIGHTS] == second[WEIGHTS]
    assert first[ONNX] == second[ONNX]
    assert first[WEIGHTS] != other[WEIGHTS]


def test_initial_artifacts_publish_as_version_zero() -> None:
    store = MemoryStore()
    artifacts, metadata = build_initial_artifacts(SPEC, seed=0)

    manifest = store.publish("digits", 0, artifacts, parent=None, metadata=metadata)

    assert store.latest_version("digits") == 0
    assert store.get_blob(manifest.artifacts[ONNX].sha256) == artifacts[ONNX][0]
    assert store.get_manifest("digits", 0).metadata == metadata
