"""TorchScript export: a device loads, re-weights and trains the module."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from model_store import (
    ExportError,
    ModelSpec,
    build_model,
    export_torchscript,
    export_torchscript_lite,
)

SPEC = ModelSpec("mlp", (64,), 10, hidden=(32,))


def test_round_trip_gives_the_same_outputs() -> None:
    model = build_model(ModelSpec("mnist_cnn", (1, 28, 28), 10), seed=0).eval()
    x = torch.randn(3, 1, 28, 28)

    loaded = torch.jit.load(io.BytesIO(export_torchscript(model)))
    loaded.eval()

    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_saved_module_starts_in_training_mode_and_model_mode_is_restored() -> None:
    model = build_model(SPEC, seed=0).eval()

    loaded = torch.jit.load(io.BytesIO(export_torchscript(model)))

    assert loaded.training
    assert not model.training


def test_loaded_module_takes_new_weights_and_trains() -> None:
    # Prepare: the device gets the module plus another version's weights.
    loaded = torch.jit.load(io.BytesIO(export_torchscript(build_model(SPEC, seed=0))))
    new_version = build_model(SPEC, seed=1)
    loaded.load_state_dict(new_version.state_dict())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=generator)
    y = torch.randint(0, 10, (32,), generator=generator)
    optimizer = torch.optim.SGD(loaded.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    initial = loss_fn(loaded(x), y).item()
    torch.testing.assert_close(loaded(x), new_version(x))

    # Execute
    for _ in range(20):
        optimizer.zero_grad()
        loss = loss_fn(loaded(x), y)
        loss.backward()
        optimizer.step()

    # Assert
    assert loss_fn(loaded(x), y).item() < 0.75 * initial


def test_lite_module_matches() -> None:
    from torch.jit.mobile import _load_for_lite_interpreter

    model = build_model(SPEC, seed=0)
    x = torch.randn(2, 64)

    lite = _load_for_lite_interpreter(io.BytesIO(export_torchscript_lite(model)))

    with torch.no_grad():
        np.testing.assert_array_equal(lite(x).numpy(), model.eval()(x).numpy())


class _Unscriptable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(x))


def test_unscriptable_model_raises_export_error() -> None:
    with pytest.raises(ExportError, match="torch.jit.script failed"):
        export_torchscript(_Unscriptable())
