from __future__ import annotations

import numpy as np
import pytest

from aggregator_service.strategies import FedAvg, FedNova
from aggregator_service.types import ClientUpdate


def _u(values: list[float], n: int, steps: float | None) -> ClientUpdate:
    metrics = {} if steps is None else {"local_steps": steps}
    return ClientUpdate("d", {"w": np.array(values)}, n, metrics)


def test_fednova_normalises_each_step_by_the_local_work() -> None:
    current = {"w": np.array([1.0, 1.0])}
    # a: n = 1, tau = 1, x - y = [1, 0], d = [1, 0]; b: n = 3, tau = 4, x - y = [0, 4], d = [0, 1].
    # p = [1/4, 3/4]; tau_eff = 1/4 + 3 = 3.25; sum p d = [0.25, 0.75];
    # x_new = x - 3.25 [0.25, 0.75] = [0.1875, -1.4375] (FedAvg would give [0.75, -2.0]).
    updates = [_u([0.0, 1.0], 1, 1), _u([1.0, -3.0], 3, 4)]

    new = FedNova().aggregate(1, current, updates)

    assert new is not None
    np.testing.assert_allclose(new["w"], [0.1875, -1.4375])


def test_fednova_with_equal_local_steps_is_fedavg() -> None:
    current = {"w": np.array([1.0, 1.0])}
    updates = [_u([0.0, 1.0], 1, 5), _u([1.0, -3.0], 3, 5)]

    new = FedNova().aggregate(1, current, updates)

    assert new is not None
    np.testing.assert_allclose(new["w"], [0.75, -2.0])


@pytest.mark.parametrize("steps", [None, 0.0, float("inf")])
def test_fednova_needs_a_positive_step_count_from_every_update(steps: float | None) -> None:
    strategy = FedNova()
    state = strategy.begin(1, {"w": np.zeros(2)})

    with pytest.raises(ValueError, match="local_steps"):
        strategy.fold(state, _u([1.0, 1.0], 1, steps))


def test_fednova_sends_devices_nothing() -> None:
    assert FedNova().configure_round(1) == {} == FedAvg().configure_round(1)
