from __future__ import annotations

import numpy as np
import pytest

from aggregator_service.strategies import Scaffold
from aggregator_service.types import ClientUpdate


def _u(values: list[float], control: list[float] | None) -> ClientUpdate:
    delta = None if control is None else {"w": np.array(control)}
    return ClientUpdate("d", {"w": np.array(values)}, 10, control_delta=delta)


def test_scaffold_steps_the_model_and_the_control_variate_over_rounds() -> None:
    strategy = Scaffold(num_clients=4, server_lr=0.5)
    x0 = {"w": np.array([1.0, 0.0])}

    # Round 1: Δy = [1, 0] and [0, 2], mean [0.5, 1.0]; x1 = x0 + 0.5 mean = [1.25, 0.5].
    # c = 0 + (2 / 4) mean([1, 2], [3, 0]) = 0.5 [2, 1] = [1.0, 0.5].
    x1 = strategy.aggregate(1, x0, [_u([2.0, 0.0], [1.0, 2.0]), _u([1.0, 2.0], [3.0, 0.0])])
    assert x1 is not None
    c1 = strategy.control()
    # Round 2: one client, Δy = [1, 1]: x2 = x1 + 0.5 [1, 1] = [1.75, 1.0];
    # c = c1 + (1 / 4) [-2, 2] = [0.5, 1.0].
    x2 = strategy.aggregate(2, x1, [_u([2.25, 1.5], [-2.0, 2.0])])

    np.testing.assert_allclose(x1["w"], [1.25, 0.5])
    np.testing.assert_allclose(c1["w"], [1.0, 0.5])
    assert x2 is not None
    np.testing.assert_allclose(x2["w"], [1.75, 1.0])
    np.testing.assert_allclose(strategy.control()["w"], [0.5, 1.0])


def test_the_control_variate_is_zero_before_the_first_round_and_in_the_model_dtype() -> None:
    strategy = Scaffold(num_clients=2)
    like = {"w": np.ones(3, np.float32)}

    before = strategy.control(like)
    strategy.aggregate(1, like, [ClientUpdate("a", like, 1, control_delta=like)])
    after = strategy.control(like)

    np.testing.assert_array_equal(before["w"], np.zeros(3))
    np.testing.assert_allclose(after["w"], np.full(3, 0.5))  # sum(Δc) / N = 1 / 2
    assert after["w"].dtype == np.float32
    assert strategy.configure_round(1) == {"scaffold": True}
    with pytest.raises(ValueError):
        Scaffold(num_clients=2).control()


def test_scaffold_refuses_updates_without_a_matching_control_delta() -> None:
    strategy = Scaffold(num_clients=4)
    state = strategy.begin(1, {"w": np.zeros(2)})

    with pytest.raises(ValueError, match="control_delta"):
        strategy.fold(state, _u([1.0, 1.0], None))
    with pytest.raises(ValueError, match="shape"):
        strategy.fold(state, _u([1.0, 1.0], [1.0, 2.0, 3.0]))


def test_scaffold_refuses_more_updates_than_clients() -> None:
    strategy = Scaffold(num_clients=1)
    state = strategy.begin(1, {"w": np.zeros(2)})
    strategy.fold(state, _u([1.0, 1.0], [0.0, 0.0]))

    with pytest.raises(ValueError, match="num_clients"):
        strategy.fold(state, _u([1.0, 1.0], [0.0, 0.0]))
