"""Every registered strategy honours the shared interface: settings, streaming, state."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from aggregator_service.strategies import STRATEGIES, FedBuff, Strategy
from aggregator_service.types import ClientUpdate, Weights

# The fewest settings each strategy needs; most need none.
REQUIRED: dict[str, dict[str, Any]] = {
    "scaffold": {"num_clients": 20},
    "qfedavg": {"lr": 0.1},
    "krum": {"num_byzantine": 1},
    "multikrum": {"num_byzantine": 1, "num_selected": 3},
    "trimmed_mean": {"beta": 0.2},
    "fedbuff": {"buffer_size": 8, "max_staleness": 5},
}
STATEFUL = ["fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold", "fedbuff"]


def _make(name: str) -> Strategy:
    strategy = STRATEGIES[name](**REQUIRED.get(name, {}))
    if isinstance(strategy, FedBuff):
        strategy.set_version(3)
    return strategy


def _model() -> Weights:
    return {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}


def _updates(seed: int, count: int = 7) -> list[ClientUpdate]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        weights = {
            k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in _model().items()
        }
        out.append(
            ClientUpdate(
                f"d{i}",
                weights,
                int(rng.integers(1, 50)),
                metrics={"local_steps": float(rng.integers(1, 10)), "loss_before": 0.5 + i},
                base_version=3 - i % 3,
                control_delta={
                    k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in _model().items()
                },
            )
        )
    return out


def _assert_same(a: Weights | None, b: Weights | None) -> None:
    assert a is not None and b is not None
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_the_registry_holds_every_strategy_under_its_own_name() -> None:
    expected = {
        "fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fednova",
        "scaffold", "qfedavg", "median", "trimmed_mean", "krum", "multikrum", "fedbuff",
    }  # fmt: skip

    assert set(STRATEGIES) == expected
    assert all(cls.name == name for name, cls in STRATEGIES.items())


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_streaming_in_another_order_equals_the_batch_form(name: str) -> None:
    current, updates = _model(), _updates(seed=1)
    batch = _make(name).aggregate(1, current, updates)

    streaming = _make(name)
    state = streaming.begin(1, current)
    for update in reversed(updates):
        streaming.fold(state, update)
    streamed = streaming.finish(1, current, state)

    _assert_same(streamed, batch)
    assert streamed is not None and streamed["w"].dtype == np.float32


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_round_with_nothing_folded_produces_no_model(name: str) -> None:
    assert _make(name).aggregate(1, _model(), []) is None


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_unknown_settings_are_a_type_error(name: str) -> None:
    with pytest.raises(TypeError):
        STRATEGIES[name](**REQUIRED.get(name, {}), no_such_setting=1)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_summary_names_the_strategy_and_its_settings(name: str) -> None:
    summary = _make(name).summary()

    assert summary["name"] == name
    assert REQUIRED.get(name, {}).items() <= summary.items()


@pytest.mark.parametrize(
    ("name", "settings", "bad"),
    [
        ("fedavgm", {"server_lr": 0.0}, "server_lr"),
        ("fedavgm", {"momentum": 1.0}, "momentum"),
        ("fedavgm", {"momentum": True}, "momentum"),
        ("fedavgm", {"momentum": "0.9"}, "momentum"),
        ("fedavgm", {"server_lr": float("nan")}, "server_lr"),
        ("fedprox", {"proximal_mu": -0.1}, "proximal_mu"),
        ("fedadam", {"eta": 0.0}, "eta"),
        ("fedadam", {"beta_1": 1.0}, "beta_1"),
        ("fedadam", {"beta_2": 1.5}, "beta_2"),
        ("fedyogi", {"tau": 0.0}, "tau"),
        ("fedadagrad", {"beta_1": -0.1}, "beta_1"),
        ("scaffold", {"num_clients": 0}, "num_clients"),
        ("scaffold", {"num_clients": 2.5}, "num_clients"),
        ("scaffold", {"num_clients": 4, "server_lr": -1.0}, "server_lr"),
        ("qfedavg", {"q": -1.0, "lr": 0.1}, "q"),
        ("qfedavg", {"lr": 0.0}, "lr"),
        ("qfedavg", {}, "exactly one"),
        ("qfedavg", {"lr": 0.1, "lipschitz": 10.0}, "exactly one"),
        ("median", {"max_updates": 0}, "max_updates"),
        ("trimmed_mean", {"beta": 0.5}, "beta"),
        ("krum", {"num_byzantine": -1}, "num_byzantine"),
        ("multikrum", {"num_selected": 0}, "num_selected"),
        ("fedbuff", {"buffer_size": 0}, "buffer_size"),
        ("fedbuff", {"max_staleness": -1}, "max_staleness"),
    ],
)
def test_bad_setting_values_are_a_value_error_naming_the_setting(
    name: str, settings: dict[str, Any], bad: str
) -> None:
    with pytest.raises(ValueError, match=bad):
        STRATEGIES[name](**settings)


def test_settings_a_variant_does_not_have_are_a_type_error() -> None:
    with pytest.raises(TypeError):
        STRATEGIES["fedadagrad"](beta_2=0.9)  # Adagrad has no second-moment decay
    with pytest.raises(TypeError):
        STRATEGIES["scaffold"]()  # num_clients is required


@pytest.mark.parametrize("name", STATEFUL)
def test_a_checkpoint_restores_the_server_state_into_a_fresh_strategy(name: str) -> None:
    current = _model()
    original = _make(name)
    after_one = original.aggregate(1, current, _updates(seed=2))
    assert after_one is not None
    saved = original.state_dict()

    restored = _make(name)
    restored.load_state_dict(saved)

    assert saved  # something to carry over
    _assert_same(
        restored.aggregate(2, after_one, _updates(seed=3)),
        original.aggregate(2, after_one, _updates(seed=3)),
    )


@pytest.mark.parametrize("name", STATEFUL)
def test_a_checkpoint_with_foreign_keys_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="unknown"):
        _make(name).load_state_dict({"nonsense": 1})


@pytest.mark.parametrize("name", sorted(set(STRATEGIES) - set(STATEFUL)))
def test_stateless_strategies_checkpoint_nothing(name: str) -> None:
    strategy = _make(name)
    strategy.aggregate(1, _model(), _updates(seed=4))

    assert strategy.state_dict() == {}
    strategy.load_state_dict({})
    with pytest.raises(ValueError):
        strategy.load_state_dict({"m/w": np.zeros(3)})
