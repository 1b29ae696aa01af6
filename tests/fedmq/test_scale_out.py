"""Several aggregator workers on one experiment commit the model one worker would.

Each worker folds its share of a round's updates into a partial; one of them
combines the sealed partials. Sums add, so the result equals one worker's up
to float64 rounding, for every strategy, the robust rules (their partials are
the updates, which the one combiner takes whole) and DP-FedAvg (its noise is
drawn once, by the combiner) included.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load

from fedmq.compose import simulate

STRATEGIES: list[dict[str, Any]] = [
    {"name": "fedavg"},
    {"name": "fedadam", "eta": 0.01},
    {"name": "scaffold", "num_clients": 6},
    {"name": "fednova"},
    {"name": "qfedavg", "q": 0.2, "lr": 0.1},
    {"name": "median"},
    {"name": "fedprox", "proximal_mu": 0.01},
    {"name": "fedavgm", "momentum": 0.9},
    {"name": "fedyogi", "eta": 0.01},
    {"name": "fedadagrad", "eta": 0.01},
    {"name": "trimmed_mean", "beta": 0.25},
    {"name": "krum", "num_byzantine": 0},
    {"name": "multikrum", "num_byzantine": 0},
    {
        "name": "dpfedavg",
        "clip_norm": 1.0,
        "noise_multiplier": 0.1,
        "sampling_rate": 0.67,
        "num_clients": 6,
        "seed": 1,
    },
]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s["name"])
def test_three_workers_commit_what_one_worker_commits(
    small_config: Any, strategy: dict[str, Any]
) -> None:
    # No over-selection: which extra reports beat the close would depend on the workers.
    config = small_config(strategy=strategy, rounds={"count": 3, "over_selection": 1.0})

    one = simulate(config)
    three = simulate(config, workers=3)

    assert [r.state for r in three.rounds] == ["committed"] * 3, three.rounds
    assert [sorted(r.accepted_devices) for r in three.rounds] == [
        sorted(r.accepted_devices) for r in one.rounds
    ]
    assert all(len(set(r.accepted)) == len(r.accepted) == 4 for r in three.rounds)
    expected, got = load(one.final_weights), load(three.final_weights)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-6)
    initial = load(one.initial_weights)
    assert any(not np.array_equal(initial[k], got[k]) for k in initial)


def test_three_workers_share_fedbuff_steps_counting_every_update_once(small_config: Any) -> None:
    strategy = {"name": "fedbuff", "buffer_size": 4, "max_staleness": 4}
    config = small_config(strategy=strategy, rounds={"count": 4})

    three = simulate(config, workers=3)

    assert [r.state for r in three.rounds] == ["committed"] * 4, three.rounds
    assert [r.version for r in three.rounds] == [1, 2, 3, 4]
    counted = [update for r in three.rounds for update in r.accepted]
    assert len(counted) == len(set(counted)) >= 4 * 4  # once each, across steps too
    initial, final = load(three.initial_weights), load(three.final_weights)
    assert any(not np.array_equal(initial[k], final[k]) for k in initial)
