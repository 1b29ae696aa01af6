"""The kit's report and its timing judgement, without a device."""

from __future__ import annotations

import pytest

import fedmq.conformance
from fedmq.conformance import Check, CheckResult, Outcome, Report
from fedmq.conformance._session_judges import judge_come_back_later
from fedmq.conformance._standin import Arrival


def _all_passing() -> list[CheckResult]:
    return [CheckResult.passing(check, "ok") for check in Check]


def test_the_public_surface_is_its_all() -> None:
    for name in fedmq.conformance.__all__:
        assert hasattr(fedmq.conformance, name), name


def test_a_report_puts_results_in_check_order_and_passes_only_when_all_pass() -> None:
    results = list(reversed(_all_passing()))

    report = Report.of(results)

    assert [r.name for r in report.results] == list(Check)
    assert report.passed
    assert report.exit_status() == 0


def test_a_check_not_checked_is_not_a_pass() -> None:
    results = _all_passing()
    results[-1] = CheckResult.unchecked(Check.RECONNECT, "not an MQTT broker")

    report = Report.of(results)

    assert not report.passed
    assert report.exit_status() == 1
    assert report.not_checked == {Check.RECONNECT}
    assert report.failed == frozenset()
    assert "1 not checked" in report.table()


def test_a_report_needs_exactly_one_result_per_check() -> None:
    with pytest.raises(ValueError, match="no result for reconnect"):
        Report.of(_all_passing()[:-1])
    with pytest.raises(ValueError, match="two results for check_in"):
        Report.of([*_all_passing(), CheckResult.failing(Check.CHECK_IN, "again")])


def test_the_table_has_a_row_per_check_naming_its_outcome() -> None:
    results = _all_passing()
    results[1] = CheckResult.failing(Check.TASK_HANDLING, "base_version 0 != 1")

    rows = Report.of(results).table().splitlines()

    assert len(rows) == len(Check) + 2
    assert rows[2].split(None, 2) == ["task_handling", Outcome.FAILED.value, "base_version 0 != 1"]


@pytest.mark.parametrize(
    ("arrived_after", "outcome"),
    [(0.2, Outcome.FAILED), (1.0, Outcome.PASSED), (3.0, Outcome.PASSED), (None, Outcome.FAILED)],
)
def test_come_back_later_fails_an_early_check_in_and_a_missing_one(
    arrived_after: float | None, outcome: Outcome
) -> None:
    sent_at = 100.0
    check_in = None if arrived_after is None else Arrival("t", b"", sent_at + arrived_after)

    result = judge_come_back_later(sent_at, check_in, retry_after_s=1.0, grace_s=5.0)

    assert result.outcome is outcome
