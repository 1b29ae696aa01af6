"""Judging the device's presence on the bus: its check-ins, its patience, its reconnects."""

from __future__ import annotations

from broker import CheckIn, CodecError, MessageKind
from broker.errors import Refused
from broker.identity import KeyRing
from broker.verify import Verifier
from fedmq.conformance._report import Check, CheckResult
from fedmq.conformance._standin import Arrival, ServiceStandIn

MAX_PLATFORM_CHARS = 32
TIMER_SLACK_S = 0.05
"""How much earlier than asked a check-in may arrive and still count as on time (timer grain)."""


def judge_check_in(
    arrival: Arrival | None, standin: ServiceStandIn, timeout_s: float
) -> CheckResult:
    """Judge the device's first check-in as the coordinator would, and against its schema."""
    check = Check.CHECK_IN
    topic = standin.topics.checkin(standin.device_id)
    if arrival is None:
        return CheckResult.failing(check, f"no check-in on {topic} within {timeout_s:g} s")
    verifier = Verifier(
        KeyRing({standin.device_id: standin.device_key}), kinds=(MessageKind.CHECK_IN,)
    )
    try:
        message = verifier.open(arrival.body)
    except Refused as exc:
        return CheckResult.failing(
            check, f"the coordinator refuses it as {exc.reason} ({exc.detail})"
        )
    assert isinstance(message, CheckIn)
    problems = []
    if arrival.topic != topic:
        problems.append(f"published on {arrival.topic}, not {topic}")
    if message.device_id != standin.device_id:
        problems.append(f"body device_id {message.device_id!r} is not the sender")
    if not 0 < len(message.platform) <= MAX_PLATFORM_CHARS:
        problems.append(f"platform must be 1 to {MAX_PLATFORM_CHARS} characters")
    for key in (CheckIn.TASKS_IN_PROGRESS, CheckIn.EXAMPLES):
        value = message.capabilities.get(key)
        least = 0 if key == CheckIn.TASKS_IN_PROGRESS else 1
        if value is not None and (type(value) is not int or value < least):
            problems.append(f"capability {key} must be an integer >= {least}, not {value!r}")
    schema = schema_problem(arrival.body)
    if schema:
        problems.append(schema)
    if problems:
        return CheckResult.failing(check, "; ".join(problems))
    return CheckResult.passing(
        check, f"signed check_in on {topic}, platform {message.platform!r}, {_schema_note()}"
    )


def examples_declared(arrival: Arrival | None, default: int) -> int:
    """Return the examples a check-in declares (the grant's limit), else ``default``."""
    message = arrival.message if arrival is not None else None
    if isinstance(message, CheckIn):
        value = message.capabilities.get(CheckIn.EXAMPLES)
        if type(value) is int and value >= 1:
            return min(value, default)
    return default


def judge_come_back_later(
    sent_at: float, check_in: Arrival | None, retry_after_s: float, grace_s: float
) -> CheckResult:
    """Judge when the device checked in again after a come-back-later sent at ``sent_at``."""
    check = Check.COME_BACK_LATER
    if check_in is None:
        return CheckResult.failing(
            check,
            f"no check-in within {retry_after_s + grace_s:g} s of a come_back_later saying "
            f"{retry_after_s:g} s (check in again once it has passed)",
        )
    after = check_in.at - sent_at
    if after < retry_after_s - TIMER_SLACK_S:
        return CheckResult.failing(
            check, f"checked in {after:.2f} s after a come_back_later saying {retry_after_s:g} s"
        )
    return CheckResult.passing(
        check, f"checked in again {after:.2f} s after a come_back_later saying {retry_after_s:g} s"
    )


def schema_problem(frame: bytes) -> str | None:
    """Return how ``frame``'s header breaks its JSON Schema, or None (also without jsonschema)."""
    try:
        from broker.schemas import validate_frame

        validate_frame(frame)
    except ModuleNotFoundError:
        return None
    except CodecError as exc:
        return str(exc)
    return None


def _schema_note() -> str:
    try:
        import jsonschema  # noqa: F401
    except ModuleNotFoundError:
        return "schema not checked (install jsonschema)"
    return "header valid against check_in.json"
