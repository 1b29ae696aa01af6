"""An aggregation tree: regions with edge workers, bridged to a root that only combines.

Each region is a bus of its own with half the devices and an edge worker;
the root's worker sees no device update, only the regions' partials. The
tree commits the model the flat run commits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load

from aggregator_service import ConfigError
from aggregator_service.checkpoints import Checkpoints
from fedmq.compose import run_experiment, simulate
from model_store import LocalStore

ROUNDS = 3


@pytest.mark.parametrize(
    "strategy",
    [{"name": "fedavg"}, {"name": "scaffold", "num_clients": 6}],
    ids=lambda s: s["name"],
)
def test_a_two_level_tree_commits_what_the_flat_run_commits(
    small_config: Any, strategy: dict[str, Any], tmp_path: Path
) -> None:
    config = small_config(strategy=strategy, rounds={"count": ROUNDS, "over_selection": 1.0})

    flat = simulate(config)
    tree = simulate(config, regions=2, workdir=tmp_path)

    assert [r.state for r in tree.rounds] == ["committed"] * ROUNDS, tree.rounds
    assert [sorted(r.accepted_devices) for r in tree.rounds] == [
        sorted(r.accepted_devices) for r in flat.rounds
    ]
    expected, got = load(flat.final_weights), load(tree.final_weights)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-6)
    # Every round was folded by the two edge workers, each from its own region's
    # devices; the root's worker never joined a round (it saw no update).
    checkpoints = Checkpoints(LocalStore(tmp_path / "store"))
    for record in tree.rounds:
        edges = checkpoints.roster(tree.experiment_id, record.number)
        assert len(edges) == 2, edges
        shares = [
            set(checkpoints.latest(tree.experiment_id, record.number, edge).accepted_devices)
            for edge in edges
        ]
        assert shares[0] and shares[1] and not shares[0] & shares[1]
        assert shares[0] | shares[1] == set(record.accepted_devices)


def test_regions_are_refused_on_a_real_broker(small_config: Any) -> None:
    with pytest.raises(ConfigError, match="fedmq bridge"):
        run_experiment(small_config(), broker_url="mqtt://127.0.0.1:1", regions=2)
