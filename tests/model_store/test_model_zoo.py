"""The model zoo: specs, parameter counts, deterministic initialization."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from model_store import ZOO_NAMES, ModelSpec, ModelSpecError, build_model

SPECS = {
    "logreg": ModelSpec("logreg", (64,), 10),
    "mlp": ModelSpec("mlp", (64,), 10),
    "mnist_2nn": ModelSpec("mnist_2nn", (1, 28, 28), 10),
    "mnist_cnn": ModelSpec("mnist_cnn", (1, 28, 28), 10),
}


def _num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_zoo_name_has_a_test_spec() -> None:
    assert set(SPECS) == set(ZOO_NAMES)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (ModelSpec("mnist_2nn", (1, 28, 28), 10), 199_210),
        (ModelSpec("mnist_2nn", (784,), 10), 199_210),
        (ModelSpec("mnist_cnn", (1, 28, 28), 10), 1_663_370),
        (ModelSpec("mnist_cnn", (3, 17, 9), 5), 318_917),  # pools floor 17 -> 4, 9 -> 2
        (ModelSpec("logreg", (64,), 10), 650),
        (ModelSpec("mlp", (64,), 10), 64 * 64 + 64 + 64 * 10 + 10),
        (ModelSpec("mlp", (8, 8), 3, hidden=(16, 4)), 64 * 16 + 16 + 16 * 4 + 4 + 4 * 3 + 3),
    ],
)
def test_parameter_counts(spec: ModelSpec, expected: int) -> None:
    assert _num_parameters(build_model(spec, seed=0)) == expected
    assert spec.parameter_count() == expected  # the same, without building the model


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_models_output_logits_for_a_batch(name: str) -> None:
    spec = SPECS[name]
    model = build_model(spec, seed=0)

    logits = model(torch.randn(5, *spec.input_shape))

    assert logits.shape == (5, spec.num_classes)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_models_are_scriptable(name: str) -> None:
    spec = SPECS[name]
    model = build_model(spec, seed=0)
    x = torch.randn(2, *spec.input_shape)

    scripted = torch.jit.script(model)

    torch.testing.assert_close(scripted(x), model(x))


def test_state_dict_names_are_readable() -> None:
    model = build_model(SPECS["mnist_cnn"], seed=0)

    assert list(model.state_dict()) == [
        "conv1.weight",
        "conv1.bias",
        "conv2.weight",
        "conv2.bias",
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
    ]


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_same_seed_same_weights_other_seed_other_weights(name: str) -> None:
    spec = SPECS[name]

    a = build_model(spec, seed=7).state_dict()
    b = build_model(spec, seed=7).state_dict()
    c = build_model(spec, seed=8).state_dict()

    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_build_model_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)

    build_model(SPECS["mlp"], seed=0)

    assert torch.equal(torch.rand(3), expected)


def test_from_config_round_trip() -> None:
    cfg = {"zoo": "mlp", "input_shape": [64], "num_classes": 10, "hidden": [32, 16]}

    spec = ModelSpec.from_config(cfg)

    assert spec == ModelSpec("mlp", (64,), 10, hidden=(32, 16))
    assert spec.to_config() == cfg
    assert ModelSpec.from_config(spec.to_config()) == spec


@pytest.mark.parametrize(
    "cfg",
    [
        {"zoo": "resnet", "input_shape": [64], "num_classes": 10},
        {"zoo": "mlp", "input_shape": [], "num_classes": 10},
        {"zoo": "mlp", "input_shape": [0], "num_classes": 10},
        {"zoo": "mlp", "input_shape": [-3], "num_classes": 10},
        {"zoo": "mlp", "input_shape": "64", "num_classes": 10},
        {"zoo": "mlp", "input_shape": 64, "num_classes": 10},
        {"zoo": "mlp", "input_shape": [64.0], "num_classes": 10},
        {"zoo": "mlp", "input_shape": [64], "num_classes": 1},
        {"zoo": "mlp", "input_shape": [64], "num_classes": True},
        {"zoo": "mlp", "input_shape": [64], "num_classes": 10, "hidden": [0]},
        {"zoo": "mlp", "input_shape": [64], "num_classes": 10, "hidden": {}},  # not a list
        {"zoo": "logreg", "input_shape": [64], "num_classes": 10, "hidden": [8]},
        {"zoo": "mnist_cnn", "input_shape": [784], "num_classes": 10},
        {"zoo": "mnist_cnn", "input_shape": [1, 2, 28], "num_classes": 10},
        {"zoo": "mlp", "input_shape": [64]},
        {"zoo": "mlp", "input_shape": [64], "num_classes": 10, "dropout": 0.5},
        ["mlp"],
    ],
)
def test_bad_specs_raise_model_spec_error(cfg: Any) -> None:
    with pytest.raises(ModelSpecError):
        ModelSpec.from_config(cfg)


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_bad_seed_raises_model_spec_error(seed: Any) -> None:
    with pytest.raises(ModelSpecError):
        build_model(SPECS["logreg"], seed=seed)
