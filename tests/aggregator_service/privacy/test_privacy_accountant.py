from __future__ import annotations

import dp_accounting
import pytest

from aggregator_service.privacy import PrivacyAccountant


def test_epsilon_is_dp_accountings_own_for_the_same_mechanism() -> None:
    accountant = PrivacyAccountant(noise_multiplier=1.1, sampling_rate=0.01, delta=1e-5)
    reference = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1))

    epsilons = [accountant.step() for _ in range(3)]
    reference.compose(event, 3)

    assert epsilons[-1] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert accountant.steps == 3


def test_many_rounds_at_once_equal_one_at_a_time() -> None:
    one_by_one = PrivacyAccountant(0.8, 0.05, 1e-6)
    at_once = PrivacyAccountant(0.8, 0.05, 1e-6)

    for _ in range(4):
        one_by_one.step()

    assert at_once.step(4) == pytest.approx(one_by_one.epsilon, rel=1e-9)
    assert PrivacyAccountant(0.8, 0.05, 1e-6).epsilon == 0.0


@pytest.mark.parametrize(
    ("settings", "bad"),
    [
        ({"noise_multiplier": 0.0, "sampling_rate": 0.1, "delta": 1e-5}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "sampling_rate": 1.5, "delta": 1e-5}, "sampling_rate"),
        ({"noise_multiplier": 1.0, "sampling_rate": 0.1, "delta": 1.0}, "delta"),
    ],
)
def test_the_accountant_validates_its_settings(settings: dict[str, float], bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        PrivacyAccountant(**settings)
