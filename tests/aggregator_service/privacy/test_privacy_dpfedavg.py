from __future__ import annotations

import math
from typing import Any

import dp_accounting
import numpy as np
import pytest

from aggregator_service.privacy import DPFedAvg
from aggregator_service.types import ClientUpdate, Weights


def _u(values: list[float]) -> ClientUpdate:
    return ClientUpdate("d", {"w": np.array(values)}, 100)


def _random_updates(seed: int, count: int = 6) -> list[ClientUpdate]:
    rng = np.random.default_rng(seed)
    return [
        ClientUpdate(f"d{i}", {"w": rng.normal(0, 1, 8).astype(np.float32)}, 1)
        for i in range(count)
    ]


def test_without_noise_dpfedavg_clips_and_divides_by_the_expected_count() -> None:
    strategy = DPFedAvg(clip_norm=1.0, noise_multiplier=0.0, sampling_rate=0.5, num_clients=4)
    # m = 0.5 * 4 = 2. Deltas [3, 4] (norm 5 -> [0.6, 0.8]) and [0.5, 0] (kept), unweighted:
    # x + ([0.6, 0.8] + [0.5, 0]) / 2 = [0.55, 0.4].
    new = strategy.aggregate(1, {"w": np.zeros(2)}, [_u([3.0, 4.0]), _u([0.5, 0.0])])

    assert new is not None
    np.testing.assert_allclose(new["w"], [0.55, 0.4])
    assert strategy.summary()["epsilon"] is None  # no noise, no guarantee


def test_the_noise_on_the_average_has_std_z_c_over_m() -> None:
    # z = 1, C = 2, m = 0.5 * 8 = 4: std = 0.5. One update equal to the model adds nothing.
    strategy = DPFedAvg(
        clip_norm=2.0, noise_multiplier=1.0, sampling_rate=0.5, num_clients=8, seed=3
    )
    current = {"w": np.zeros(40_000)}

    new = strategy.aggregate(1, current, [ClientUpdate("d", current, 1)])

    assert new is not None
    assert abs(new["w"].std() - 0.5) < 3 * 0.5 / math.sqrt(80_000)


def test_epsilon_after_each_round_is_dp_accountings_value() -> None:
    strategy = DPFedAvg(
        clip_norm=1.0, noise_multiplier=1.3, sampling_rate=0.1, num_clients=50, delta=1e-6, seed=0
    )
    x: Weights | None = {"w": np.zeros(8, np.float32)}
    for rnd in range(1, 4):
        assert x is not None
        x = strategy.aggregate(rnd, x, _random_updates(rnd))

    reference = dp_accounting.rdp.RdpAccountant()
    reference.compose(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.3)), 3
    )
    summary = strategy.summary()
    assert summary["rounds"] == 3
    assert summary["epsilon"] == pytest.approx(reference.get_epsilon(1e-6), rel=1e-12)


def test_adaptive_clipping_moves_the_clip_norm_toward_the_quantile() -> None:
    strategy = DPFedAvg(
        clip_norm=100.0,
        noise_multiplier=0.5,
        sampling_rate=1.0,
        num_clients=20,
        target_quantile=0.5,
        seed=0,
    )
    x: Weights | None = {"w": np.zeros(8, np.float32)}
    for rnd in range(1, 4):
        assert x is not None
        x = strategy.aggregate(rnd, x, _random_updates(rnd, count=20))

    # Every update (norm about sqrt(8)) fits under 100, so b is about 1 and C shrinks by
    # about exp(-0.2 * 0.5) per round; the count noise has std m / 20 = 1, b's 1/20.
    assert (
        100 * math.exp(-0.1 * 3) * 0.9 < strategy.current_clip_norm < 100 * math.exp(-0.1 * 3) * 1.1
    )
    # z_Δ = (0.5^-2 - (2 * 1)^-2)^(-1/2) = (4 - 0.25)^(-1/2).
    assert strategy.update_noise_multiplier == pytest.approx(1 / math.sqrt(3.75))


def test_adaptive_clipping_needs_enough_count_noise() -> None:
    with pytest.raises(ValueError, match="clip_count_stddev"):
        DPFedAvg(
            clip_norm=1.0,
            noise_multiplier=1.0,
            sampling_rate=0.1,
            num_clients=20,  # m = 2, sigma_b = 0.1, and 2 sigma_b < z
            target_quantile=0.5,
        )


SETTINGS: dict[str, Any] = {
    "clip_norm": 1.0,
    "noise_multiplier": 0.7,
    "sampling_rate": 0.5,
    "num_clients": 40,
    "target_quantile": 0.6,
    "seed": 11,
}


def test_streaming_in_another_order_equals_the_batch_form() -> None:
    current = {"w": np.zeros(8, np.float32)}
    updates = _random_updates(5)
    batch = DPFedAvg(**SETTINGS).aggregate(1, current, updates)

    streaming = DPFedAvg(**SETTINGS)
    state = streaming.begin(1, current)
    for update in reversed(updates):
        streaming.fold(state, update)
    streamed = streaming.finish(1, current, state)

    assert batch is not None and streamed is not None
    np.testing.assert_allclose(streamed["w"], batch["w"], rtol=1e-6)


def test_a_checkpoint_restores_clip_norm_accounting_and_noise() -> None:
    current = {"w": np.zeros(8, np.float32)}
    original = DPFedAvg(**SETTINGS)
    x1 = original.aggregate(1, current, _random_updates(1))
    assert x1 is not None

    restored = DPFedAvg(**SETTINGS)
    restored.load_state_dict(original.state_dict())
    a = original.aggregate(2, x1, _random_updates(2))
    b = restored.aggregate(2, x1, _random_updates(2))

    assert a is not None and b is not None
    np.testing.assert_array_equal(a["w"], b["w"])
    assert restored.summary() == original.summary()
    assert restored.rounds == 2


@pytest.mark.parametrize(
    ("settings", "bad"),
    [
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"sampling_rate": 0.0}, "sampling_rate"),
        ({"num_clients": 0}, "num_clients"),
        ({"target_quantile": 1.0}, "target_quantile"),
        ({"clip_learning_rate": 0.0}, "clip_learning_rate"),
    ],
)
def test_bad_settings_are_a_value_error(settings: dict[str, Any], bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        DPFedAvg(**{**SETTINGS, **settings})
    with pytest.raises(TypeError):
        DPFedAvg(**SETTINGS, momentum=0.9)  # type: ignore[call-arg]
