from __future__ import annotations

import numpy as np

from aggregator_service.strategies import FedAvg, FedAvgM, FedProx
from aggregator_service.types import ClientUpdate


def _u(values: list[float], n: int = 1) -> ClientUpdate:
    return ClientUpdate("d", {"w": np.array(values)}, n)


def test_fedprox_asks_devices_for_the_proximal_term_and_averages_like_fedavg() -> None:
    current = {"w": np.zeros(2)}
    updates = [_u([0.0, 1.0], 1), _u([0.5, 3.0], 3)]

    strategy = FedProx(proximal_mu=0.1)
    new = strategy.aggregate(1, current, updates)
    plain = FedAvg().aggregate(1, current, updates)

    assert strategy.configure_round(1) == {"proximal_mu": 0.1}
    assert FedAvg().configure_round(1) == {}
    assert new is not None and plain is not None
    np.testing.assert_array_equal(new["w"], plain["w"])


def test_fedavgm_steps_against_the_pseudo_gradient_and_keeps_momentum() -> None:
    strategy = FedAvgM(server_lr=2.0, momentum=0.5)
    x0 = {"w": np.array([1.0, 2.0])}

    # Round 1: mean = ([0, 1]*1 + [0.5, 3]*3) / 4 = [0.375, 2.5];
    # g = x - mean = [0.625, -0.5]; v = 0 * 0.5 + g; x1 = x0 - 2 v = [-0.25, 3.0].
    x1 = strategy.aggregate(1, x0, [_u([0.0, 1.0], 1), _u([0.5, 3.0], 3)])
    # Round 2: mean = [0.25, 2.0]; g = x1 - mean = [-0.5, 1.0];
    # v = 0.5 [0.625, -0.5] + g = [-0.1875, 0.75]; x2 = x1 - 2 v = [0.125, 1.5]
    # (without momentum it would be x1 - 2 g = [0.75, 1.0]).
    assert x1 is not None
    x2 = strategy.aggregate(2, x1, [_u([0.25, 2.0], 5)])

    np.testing.assert_allclose(x1["w"], [-0.25, 3.0])
    assert x2 is not None
    np.testing.assert_allclose(x2["w"], [0.125, 1.5])
    np.testing.assert_allclose(strategy.state_dict()["velocity/w"], [-0.1875, 0.75])


def test_fedavgm_without_momentum_at_unit_rate_is_fedavg() -> None:
    current = {"w": np.array([1.0, -1.0], np.float32)}
    updates = [
        ClientUpdate("a", {"w": np.array([3.0, 0.0], np.float32)}, 2),
        ClientUpdate("b", {"w": np.array([0.0, 4.0], np.float32)}, 6),
    ]

    new = FedAvgM(server_lr=1.0, momentum=0.0).aggregate(1, current, updates)
    plain = FedAvg().aggregate(1, current, updates)

    assert new is not None and plain is not None
    assert new["w"].dtype == np.float32
    np.testing.assert_allclose(new["w"], plain["w"], rtol=1e-6)
