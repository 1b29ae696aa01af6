from __future__ import annotations

import numpy as np
import pytest

from aggregator_service.strategies import FedAvg, WeightedSum, weighted_mean
from aggregator_service.types import ClientUpdate


def _update(device: str, value: float, n: int) -> ClientUpdate:
    return ClientUpdate(
        device,
        {"w": np.full((2, 2), value, np.float32), "b": np.array([value, -value], np.float32)},
        n,
    )


def test_fedavg_weights_each_client_by_its_examples() -> None:
    current = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}
    updates = [_update("a", 1.0, 10), _update("b", 4.0, 30)]

    new = FedAvg().aggregate(1, current, updates)

    # (10 * 1 + 30 * 4) / 40 = 3.25, not the unweighted 2.5
    assert new is not None
    np.testing.assert_allclose(new["w"], np.full((2, 2), 3.25))
    np.testing.assert_allclose(new["b"], [3.25, -3.25])
    assert new["w"].dtype == np.float32


def test_streaming_fold_equals_the_batch_mean_in_any_order() -> None:
    rng = np.random.default_rng(0)
    current = {"w": np.zeros((5, 3), np.float32)}
    updates = [
        ClientUpdate(
            f"d{i}", {"w": rng.normal(size=(5, 3)).astype(np.float32)}, int(rng.integers(1, 100))
        )
        for i in range(12)
    ]
    strategy = FedAvg()

    state = strategy.begin(1, current)
    for update in reversed(updates):
        strategy.fold(state, update)
    streamed = strategy.finish(1, current, state)
    stacked = np.stack([u.weights["w"].astype(np.float64) for u in updates])
    batch = np.average(stacked, axis=0, weights=[u.num_examples for u in updates])

    assert streamed is not None
    np.testing.assert_allclose(streamed["w"], batch, rtol=1e-6)
    mean = weighted_mean([(u.weights, float(u.num_examples)) for u in updates])
    np.testing.assert_array_equal(streamed["w"], mean["w"])  # one definition: bit for bit


def test_a_round_with_no_updates_produces_no_model() -> None:
    current = {"w": np.ones(3, np.float32)}

    assert FedAvg().aggregate(1, current, []) is None


def test_weighted_sum_keeps_memory_independent_of_the_number_of_updates() -> None:
    like = {"w": np.zeros(1000, np.float32)}
    acc = WeightedSum(like)
    buffers = [id(acc.sums["w"])]

    for i in range(50):
        acc.add({"w": np.full(1000, float(i), np.float32)}, 1.0)

    assert [id(acc.sums["w"])] == buffers  # folded in place, never reallocated
    assert acc.count == 50
    np.testing.assert_allclose(acc.mean()["w"], np.full(1000, 24.5))


def test_fedavg_refuses_unknown_settings() -> None:
    with pytest.raises(TypeError):
        FedAvg(momentum=0.9)


def test_the_weighted_mean_of_large_finite_updates_is_their_mean() -> None:
    # Product bug (aggregator_service/strategies/ops.py:37): WeightedSum.add computes
    # weight * weights in the update's float32 before storing into the float64 sums,
    # so 3e38 * 10 overflows to inf and FedAvg of two finite, equal updates is inf.
    current = {"w": np.zeros(3, np.float32)}
    updates = [ClientUpdate(d, {"w": np.full(3, 3e38, np.float32)}, 10) for d in ("a", "b")]

    with np.errstate(over="raise"):
        new = FedAvg().aggregate(1, current, updates)

    assert new is not None
    np.testing.assert_allclose(new["w"], np.full(3, 3e38), rtol=1e-6)
