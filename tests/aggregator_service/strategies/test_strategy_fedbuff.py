from __future__ import annotations

import math

import numpy as np
import pytest

from aggregator_service.strategies import FedBuff, StaleUpdate, staleness_weight
from aggregator_service.types import ClientUpdate


def _delta(values: list[float], base_version: int) -> ClientUpdate:
    return ClientUpdate("d", {"w": np.array(values)}, 1, base_version=base_version)


def test_staleness_weight_is_one_over_sqrt_one_plus_tau() -> None:
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == 0.5
    assert staleness_weight(8) == pytest.approx(1 / 3)


def test_fedbuff_weights_deltas_by_staleness_and_divides_by_the_buffer_size() -> None:
    strategy = FedBuff(buffer_size=2, server_lr=1.0, max_staleness=3)
    strategy.set_version(5)
    x = {"w": np.array([1.0, 1.0])}

    # Fresh delta [1, 0] (tau = 0, s = 1) and delta [0, 2] from v2 (tau = 3, s = 1/2):
    # x + (1 [1, 0] + 0.5 [0, 2]) / 2 = [1.5, 1.5].
    new = strategy.aggregate(1, x, [_delta([1.0, 0.0], 5), _delta([0.0, 2.0], 2)])

    assert new is not None
    np.testing.assert_allclose(new["w"], [1.5, 1.5])
    assert strategy.version == 6
    assert FedBuff.takes_deltas


def test_the_version_advances_so_staleness_grows_across_rounds() -> None:
    strategy = FedBuff(buffer_size=1, server_lr=2.0, max_staleness=3)
    strategy.set_version(5)
    x1 = strategy.aggregate(1, {"w": np.zeros(1)}, [_delta([1.0], 5)])
    assert x1 is not None

    # Now at v6, a delta from v5 has tau = 1: x2 = x1 + 2 * [1] / sqrt(2) / 1.
    x2 = strategy.aggregate(2, x1, [_delta([1.0], 5)])

    np.testing.assert_allclose(x1["w"], [2.0])
    assert x2 is not None
    np.testing.assert_allclose(x2["w"], [2.0 + 2.0 / math.sqrt(2.0)])
    assert strategy.state_dict() == {"version": 7}


def test_fedbuff_rejects_updates_beyond_max_staleness() -> None:
    strategy = FedBuff(buffer_size=4, max_staleness=3)
    strategy.set_version(5)
    state = strategy.begin(1, {"w": np.zeros(2)})
    strategy.fold(state, _delta([1.0, 1.0], 2))  # tau = 3 is still accepted

    with pytest.raises(StaleUpdate, match="4 versions behind"):
        strategy.fold(state, _delta([1.0, 1.0], 1))
    with pytest.raises(ValueError, match="newer"):
        strategy.fold(state, _delta([1.0, 1.0], 6))
    assert issubclass(StaleUpdate, ValueError)


def test_a_round_that_closes_short_still_divides_by_the_buffer_size() -> None:
    strategy = FedBuff(buffer_size=4)
    strategy.set_version(0)

    new = strategy.aggregate(1, {"w": np.zeros(1)}, [_delta([2.0], 0)])

    assert new is not None
    np.testing.assert_allclose(new["w"], [0.5])  # 2 / K, K = 4


def test_fedbuff_refuses_a_full_buffer_and_an_unknown_version() -> None:
    strategy = FedBuff(buffer_size=1)
    with pytest.raises(ValueError, match="set_version"):
        strategy.begin(1, {"w": np.zeros(1)})
    strategy.set_version(0)
    state = strategy.begin(1, {"w": np.zeros(1)})
    strategy.fold(state, _delta([1.0], 0))

    with pytest.raises(ValueError, match="full"):
        strategy.fold(state, _delta([1.0], 0))
