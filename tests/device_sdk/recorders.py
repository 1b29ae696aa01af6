"""What a test bus carries, recorded for the assertions."""

from __future__ import annotations

from broker import CheckIn, Delivery, MemoryTransport, decode
from tests.identities import TOPICS


def record_checkins(transport: MemoryTransport) -> list[CheckIn]:
    """Return the list the check-ins published on ``transport`` will be appended to."""
    checkins: list[CheckIn] = []

    def record(delivery: Delivery) -> None:
        message = decode(delivery.body)
        if isinstance(message, CheckIn):
            checkins.append(message)
        delivery.ack()

    transport.subscribe(TOPICS.all_checkins, record)
    return checkins
