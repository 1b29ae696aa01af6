"""The kit's verdicts: one typed record per check, in a fixed order, and their table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum


class Check(Enum):
    """What the kit verifies about a device, in the order it runs and reports."""

    CHECK_IN = "check_in"
    TASK_HANDLING = "task_handling"
    FORGED_TASK = "forged_task"
    DOWNLOAD_CHECKSUM = "download_checksum"
    TAMPERED_ARTIFACT = "tampered_artifact"
    RESULT_SHAPE = "result_shape"
    SIGNED_UPDATE = "signed_update"
    RETRIES = "retries"
    COME_BACK_LATER = "come_back_later"
    RECONNECT = "reconnect"

    @property
    def summary(self) -> str:
        """Return what the check asks of the device, in one line."""
        return _SUMMARIES[self]


_SUMMARIES: Mapping[Check, str] = {
    Check.CHECK_IN: "checks in on its own topic, signed with its key, well-formed",
    Check.TASK_HANDLING: "answers its task once, on its update topic, copying the task's fields",
    Check.FORGED_TASK: "ignores a task the pinned service key did not sign",
    Check.DOWNLOAD_CHECKSUM: "downloads the model by its signed URL, refuses one failing sha256",
    Check.TAMPERED_ARTIFACT: "refuses an artifact whose bytes fail sha256 (checksum_mismatch)",
    Check.RESULT_SHAPE: "sends the model's tensors (names, shapes, F32, finite) and the metrics",
    Check.SIGNED_UPDATE: "signs every answer so the worker's gate admits it",
    Check.RETRIES: "retries a 5xx or a dropped connection, not a 403",
    Check.COME_BACK_LATER: "checks in again after retry_after_s, not before",
    Check.RECONNECT: "reconnects when its connection is taken, checks in and answers a task",
}


class Outcome(Enum):
    """How a check came out."""

    PASSED = "pass"
    FAILED = "FAIL"
    NOT_CHECKED = "not checked"
    """The device gave the kit no chance to observe the behaviour; the detail says why."""


@dataclass(frozen=True)
class CheckResult:
    """The verdict of one check, and what the kit saw (or missed) to reach it."""

    name: Check
    outcome: Outcome
    detail: str

    @property
    def passed(self) -> bool:
        """Return whether the device passed this check."""
        return self.outcome is Outcome.PASSED

    @classmethod
    def passing(cls, name: Check, detail: str) -> CheckResult:
        """Return a pass of ``name``."""
        return cls(name, Outcome.PASSED, detail)

    @classmethod
    def failing(cls, name: Check, detail: str) -> CheckResult:
        """Return a failure of ``name``."""
        return cls(name, Outcome.FAILED, detail)

    @classmethod
    def unchecked(cls, name: Check, reason: str) -> CheckResult:
        """Return ``name`` as not checked, and why."""
        return cls(name, Outcome.NOT_CHECKED, reason)


@dataclass(frozen=True)
class Report:
    """Every check's result, in ``Check`` order.

    Parameters
    ----------
    results
        One result per check, in ``Check`` order.
    """

    results: tuple[CheckResult, ...]

    @classmethod
    def of(cls, results: Iterable[CheckResult]) -> Report:
        """Return the report of ``results``, one per check, put in ``Check`` order.

        Raises
        ------
        ValueError
            A check has no result, or more than one.
        """
        by_name: dict[Check, CheckResult] = {}
        for result in results:
            if result.name in by_name:
                raise ValueError(f"two results for {result.name.value}")
            by_name[result.name] = result
        missing = [check.value for check in Check if check not in by_name]
        if missing:
            raise ValueError(f"no result for {', '.join(missing)}")
        return cls(tuple(by_name[check] for check in Check))

    @property
    def passed(self) -> bool:
        """Return whether every check passed (one not checked is not a pass)."""
        return all(result.passed for result in self.results)

    @property
    def failed(self) -> frozenset[Check]:
        """Return the checks the device failed."""
        return self._with(Outcome.FAILED)

    @property
    def not_checked(self) -> frozenset[Check]:
        """Return the checks the kit could not observe."""
        return self._with(Outcome.NOT_CHECKED)

    def result(self, name: Check) -> CheckResult:
        """Return the result of one check."""
        return next(result for result in self.results if result.name is name)

    def exit_status(self) -> int:
        """Return the command's exit status: 0 when every check passed, else 1."""
        return 0 if self.passed else 1

    def table(self) -> str:
        """Return the report as a text table, one row per check, and a summary line."""
        width = max(len(check.value) for check in Check)
        rows = [f"{'check':<{width}}  {'result':<11}  detail"]
        for result in self.results:
            rows.append(
                f"{result.name.value:<{width}}  {result.outcome.value:<11}  {result.detail}"
            )
        counts = {outcome: 0 for outcome in Outcome}
        for result in self.results:
            counts[result.outcome] += 1
        rows.append(
            f"{counts[Outcome.PASSED]} passed, {counts[Outcome.FAILED]} failed, "
            f"{counts[Outcome.NOT_CHECKED]} not checked"
        )
        return "\n".join(rows)

    def _with(self, outcome: Outcome) -> frozenset[Check]:
        return frozenset(result.name for result in self.results if result.outcome is outcome)
