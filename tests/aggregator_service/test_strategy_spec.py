"""A config's strategy section becomes a typed spec: what the workers build their strategy from."""

from __future__ import annotations

import re
from typing import Any

import pytest

from aggregator_service import ConfigError, ExperimentConfig
from aggregator_service.config import build_strategy, secure_strategies, strategy_classes
from aggregator_service.secagg.strategy import SecureSum
from broker import CombineRound, MaskedSumTerms, ModelRef, StrategySpec, decode, encode

REQUIRED: dict[str, dict[str, Any]] = {"dpfedavg": {"clip_norm": 1.0, "noise_multiplier": 0.5}}
"""Settings a strategy cannot do without (the rest have defaults or follow from the config)."""


def _raw(strategy: dict[str, Any], **sections: Any) -> dict[str, Any]:
    return {
        "name": "spec",
        "model": {"zoo": "mlp", "input_shape": [64], "num_classes": 10},
        "data": {"devices": 12},
        "rounds": {"devices_per_round": 4, "over_selection": 1.0},
        "strategy": strategy,
        **sections,
    }


@pytest.mark.parametrize("name", sorted(strategy_classes()))
def test_secure_aggregation_serves_the_summing_strategies_and_says_why_not_the_others(
    name: str,
) -> None:
    raw = _raw({"name": name, **REQUIRED.get(name, {})}, secure_aggregation={"clip": 2.0})
    if name not in secure_strategies():
        with pytest.raises(ConfigError) as refused:
            ExperimentConfig.from_dict(raw)
        reason = strategy_classes()[name].secure_refusal
        assert reason is not None and reason != "is not one it serves"  # its own reason
        assert f"strategy {name} {reason}; it serves fedavg, " in str(refused.value)
        return
    config = ExperimentConfig.from_dict(raw)
    assert config.strategy.masked == MaskedSumTerms(clip=2.0, max_examples=10_000)
    strategy = build_strategy(config.strategy)
    assert isinstance(strategy, SecureSum) and strategy.inner.name == name


def test_the_summing_strategies_are_the_fedavg_family_and_only_fedbuff_steps_a_buffer() -> None:
    assert sorted(secure_strategies()) == [
        "fedadagrad",
        "fedadam",
        "fedavg",
        "fedavgm",
        "fedprox",
        "fedyogi",
    ]
    buffered = [
        name
        for name in strategy_classes()
        if ExperimentConfig.from_dict(_raw({"name": name, **REQUIRED.get(name, {})})).buffered
    ]
    assert buffered == ["fedbuff"]


def test_a_secure_config_reads_back_from_its_stored_form_and_from_the_older_one() -> None:
    config = ExperimentConfig.from_dict(
        _raw({"name": "fedadam", "eta": 0.05}, secure_aggregation={"max_examples": 500})
    )
    stored = config.to_dict()

    assert stored["strategy"] == {"name": "fedadam", "eta": 0.05}  # flat, as the user wrote it
    assert ExperimentConfig.from_dict(stored) == config
    # Records FedMQ stored before the spec was typed repeat the terms in the section.
    stored["strategy"]["secure_aggregation"] = {"clip": 1.0, "max_examples": 500}
    assert ExperimentConfig.from_dict(stored) == config
    # Without secure aggregation the same key is no setting of the strategy's.
    del stored["secure_aggregation"]
    with pytest.raises(ConfigError, match=re.escape("strategy.secure_aggregation: expected a")):
        ExperimentConfig.from_dict(stored)


@pytest.mark.parametrize(
    ("strategy", "problem"),
    [
        ({"name": "fedprox", "proximal_mu": [0.1]}, "strategy.proximal_mu: expected a number"),
        ({"name": "fedavgm", "momentum": {"beta": 0.9}}, "strategy.momentum: expected a number"),
        ({"name": 3}, "strategy.name: expected a name, got 3"),
        ({"name": "fedsgd"}, "strategy.name: unknown 'fedsgd'; known: dpfedavg, fedadagrad"),
    ],
)
def test_a_strategy_section_the_workers_could_not_build_from_is_refused_by_its_place(
    strategy: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        ExperimentConfig.from_dict(_raw(strategy))


def test_a_section_without_a_name_is_fedavg() -> None:
    assert ExperimentConfig.from_dict(_raw({})).strategy == StrategySpec("fedavg")


def test_the_spec_reaches_a_worker_as_it_left_the_coordinator() -> None:
    config = ExperimentConfig.from_dict(_raw({"name": "qfedavg", "q": 0.5}))
    request = CombineRound(
        experiment_id="e",
        round=1,
        base_version=0,
        model=ModelRef("memory://weights", "0" * 64, 1),
        min_reports=1,
        strategy=config.strategy,
    )

    received = decode(encode(request))

    assert isinstance(received, CombineRound)
    assert received.strategy == StrategySpec("qfedavg", {"q": 0.5, "lr": 0.05})
    assert build_strategy(received.strategy).settings() == {"q": 0.5, "lr": 0.05, "lipschitz": 20.0}
