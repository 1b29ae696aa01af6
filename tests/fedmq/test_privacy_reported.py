"""DP-FedAvg's privacy spent is recorded with every committed round."""

from __future__ import annotations

from typing import Any

from aggregator_service.privacy.accountant import PrivacyAccountant
from fedmq.compose import simulate


def test_each_committed_round_records_the_epsilon_spent_so_far(small_config: Any) -> None:
    strategy = {"name": "dpfedavg", "clip_norm": 1.0, "noise_multiplier": 1.1}
    config = small_config(strategy=strategy, rounds={"count": 3})

    result = simulate(config)

    epsilons = [r.metrics["epsilon"] for r in result.rounds]
    sampling_rate = config.strategy.settings["sampling_rate"]
    assert isinstance(sampling_rate, float)
    accountant = PrivacyAccountant(noise_multiplier=1.1, sampling_rate=sampling_rate, delta=1e-5)
    assert epsilons == [accountant.step() for _ in range(3)]
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert all(r.metrics["clip_norm"] == 1.0 for r in result.rounds)
