"""The kit against real devices: FedMQ's Python device and both emulated phones pass it,
and a device broken in one way fails exactly the check that observes it."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from fedmq.conformance import Check, KitModel, Report, SdkDevice, emulated_handler, run_in_process
from tests.fedmq.conformance.broken_devices import BREAKAGES, EXAMPLES, broken_device
from tests.fedmq.conformance.conftest import FAST, fresh_device_id, fresh_namespace


@pytest.mark.parametrize("platform", ["python", "android", "ios"])
def test_the_device_of_each_platform_passes_every_check(
    platform: str, broker_url: str, kit_model: Callable[[str], KitModel]
) -> None:
    # Prepare: the platform's emulated trainer on the device client, its package in the tasks
    handler = emulated_handler(platform, examples=EXAMPLES)

    # Execute
    report = run_in_process(
        lambda setup: SdkDevice(setup, handler, platform=platform, examples=EXAMPLES),
        kit_model(platform),
        broker_url=broker_url,
        namespace=fresh_namespace(),
        options=FAST,
        device_id=fresh_device_id(),
    )

    # Assert
    assert report.passed, report.table()
    assert [r.name for r in report.results] == list(Check)


@pytest.fixture(scope="module")
def broken_reports(broker_url: str, kit_model: Callable[[str], KitModel]) -> dict[Check, Report]:
    """Run the kit against every broken device at once (each run mostly waits on the device)."""
    model = kit_model("python")

    def run(check: Check) -> Report:
        device = broken_device(check, emulated_handler("python", examples=EXAMPLES))
        return run_in_process(
            device,
            model,
            broker_url=broker_url,
            namespace=fresh_namespace(),
            options=FAST,
            device_id=fresh_device_id(),
        )

    with ThreadPoolExecutor(max_workers=len(Check)) as pool:
        return dict(zip(Check, pool.map(run, Check), strict=True))


def test_every_check_has_a_broken_device() -> None:
    assert set(BREAKAGES) == set(Check)


@pytest.mark.parametrize("check", list(Check), ids=lambda check: check.value)
def test_a_device_broken_for_one_check_fails_exactly_that_check(
    check: Check, broken_reports: dict[Check, Report]
) -> None:
    report = broken_reports[check]

    assert report.failed == {check}, report.table()
    assert not report.not_checked, report.table()
    assert report.exit_status() == 1
