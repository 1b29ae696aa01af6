"""The functional TorchScript lite module: weights are inputs, outputs match torch and ORT."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn
from torch.jit.mobile import _load_for_lite_interpreter

from model_store import (
    ExportError,
    ModelSpec,
    build_model,
    export_onnx,
    export_torchscript_lite_functional,
)

SPECS = {
    "mlp": ModelSpec("mlp", (64,), 10, hidden=(32,)),
    "cnn": ModelSpec("mnist_cnn", (1, 12, 12), 10),
}


@pytest.fixture(scope="module", params=sorted(SPECS))
def exported(request: pytest.FixtureRequest) -> dict[str, Any]:
    spec = SPECS[request.param]
    model = build_model(spec, seed=0)
    data, names = export_torchscript_lite_functional(model, spec.input_shape)
    session = onnxruntime.InferenceSession(
        export_onnx(model, spec.input_shape), providers=["CPUExecutionProvider"]
    )
    lite = _load_for_lite_interpreter(io.BytesIO(data))
    return {"spec": spec, "model": model, "names": names, "lite": lite, "session": session}


def _outputs(exported: dict[str, Any], weights_seed: int) -> tuple[np.ndarray, ...]:
    """Logits of one batch from torch, the lite module and ONNX Runtime, same weights."""
    spec = exported["spec"]
    reference = build_model(spec, seed=weights_seed).eval()
    state = reference.state_dict()
    x = torch.randn((5, *spec.input_shape), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = reference(x).numpy()
        lite = exported["lite"](x, *(state[n] for n in exported["names"])).numpy()
    feeds = {"input": x.numpy(), **{n: t.numpy() for n, t in state.items()}}
    (ort,) = exported["session"].run(None, feeds)
    return expected, lite, ort


@pytest.mark.parametrize("weights_seed", [0, 1], ids=["export-weights", "other-weights"])
def test_lite_torch_and_onnx_runtime_agree(exported: dict[str, Any], weights_seed: int) -> None:
    expected, lite, ort = _outputs(exported, weights_seed)

    # Measured: lite == torch exactly (0.0); ORT differs from both by <= 1e-6.
    assert np.abs(lite - expected).max() <= 1e-5
    assert np.abs(ort - expected).max() <= 1e-5
    assert np.abs(lite - ort).max() <= 1e-5


def test_the_module_follows_its_weight_inputs(exported: dict[str, Any]) -> None:
    first, _, _ = _outputs(exported, 0)
    _, lite_other, _ = _outputs(exported, 1)

    # Different weights in, different logits out: nothing was baked in.
    assert np.abs(lite_other - first).max() > 1e-2


def test_inputs_are_the_state_dict_names_in_order_and_the_mode_is_kept(
    exported: dict[str, Any],
) -> None:
    model = exported["model"]

    assert exported["names"] == list(model.state_dict())
    assert model.training


class _Baked(nn.Module):
    """Reads a weight as Python numbers: the tracer freezes them into constants."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.tensor(self.scale.tolist())


class _TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), x


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (_Baked(), "does not follow its weight inputs"),
        (_TwoOutputs(), "must return one tensor"),
    ],
    ids=["baked-weight", "tuple-output"],
)
def test_a_model_the_export_cannot_serve_raises_export_error(model: nn.Module, match: str) -> None:
    with pytest.raises(ExportError, match=match):
        export_torchscript_lite_functional(model, (4,))


def test_a_bad_input_shape_raises_export_error() -> None:
    with pytest.raises(ExportError, match="input_shape"):
        export_torchscript_lite_functional(nn.Linear(4, 2), (0,))
