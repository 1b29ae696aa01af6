"""`fedmq devices run`'s checks before it enrolls: its flags and whether the examples fit."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from aggregator_service import ServiceError
from fedmq.cli import main
from fedmq.edge import check_examples_fit


def _experiment(zoo: str, input_shape: list[int], num_classes: int = 10) -> dict[str, Any]:
    model = {"zoo": zoo, "input_shape": input_shape, "num_classes": num_classes}
    return {"id": "e1", "config": {"model": model}}


@pytest.mark.parametrize("heartbeat", ["0", "-5", "inf", "soon"])
def test_a_heartbeat_that_is_not_a_positive_number_is_refused(
    heartbeat: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    argv = ["devices", "run", "--device-id", "d", "--key-file", "k", "--data", "x.npz"]

    # Execute
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--heartbeat", heartbeat])

    # Assert
    assert exit_.value.code == 2
    assert "--heartbeat" in capsys.readouterr().err


def test_a_flattening_model_takes_examples_of_the_same_size_in_any_shape() -> None:
    # Prepare: an MLP over 784 inputs, as a config for MNIST gives it.
    experiment = _experiment("mlp", [784])
    images = np.zeros((3, 1, 28, 28), np.float32)

    # Execute / Assert: no error
    check_examples_fit(experiment, images, np.array([0, 1, 9]))


@pytest.mark.parametrize(
    ("zoo", "shape", "x_shape", "labels", "says"),
    [
        ("mlp", [64], (3, 8, 9), [0, 1, 2], r"shaped \[64\]; the data file's are \[8, 9\]"),
        ("mnist_cnn", [1, 28, 28], (3, 784), [0, 1, 2], r"shaped \[1, 28, 28\]"),
        ("mlp", [64], (3, 64), [0, 1, 10], r"10 classes \(labels 0-9\); .* has label 10"),
    ],
    ids=["size", "cnn-needs-its-shape", "label"],
)
def test_examples_the_model_cannot_take_are_refused_with_why(
    zoo: str, shape: list[int], x_shape: tuple[int, ...], labels: list[int], says: str
) -> None:
    # Prepare
    experiment = _experiment(zoo, shape)
    x = np.zeros(x_shape, np.float32)

    # Execute / Assert
    with pytest.raises(ServiceError, match=says):
        check_examples_fit(experiment, x, np.array(labels))
