"""The coordinator repeats each phase of a round (announce, close, combine) until an outcome."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from aggregator_service import Database
from broker import (
    CheckIn,
    CloseRound,
    CombineRound,
    Delivery,
    MemoryTransport,
    Message,
    RoundAbandoned,
    RoundOpened,
    decode,
)
from model_store import LocalStore
from tests.identities import TOPICS, device, round_service, sign


class Clock:
    # Starts at the real time: check-ins are signed with it, and the service
    # refuses a check-in signed far from its own clock.
    def __init__(self) -> None:
        self.now = time.time()
        self.start = self.now

    def __call__(self) -> float:
        return self.now


def test_rounds_are_reannounced_and_closed_after_the_deadline(
    tmp_path: Path, small_config: Any
) -> None:
    transport, clock = MemoryTransport(), Clock()
    db = Database("sqlite://")
    service = round_service(transport, LocalStore(tmp_path), db, clock=clock)
    service.start()
    control: list[Message] = []

    def record(delivery: Delivery) -> None:
        control.append(decode(delivery.body))
        delivery.ack()

    transport.subscribe(TOPICS.all_control, record)
    transport.subscribe(TOPICS.all_combine, record)
    config = small_config(rounds={"deadline_s": 30.0})
    experiment_id = service.create_experiment(config)
    for i in range(6):
        name = f"d{i}"
        service.register_device("python", public_key=device(name).public_key_text, device_id=name)
        transport.publish(TOPICS.checkin(name), sign(CheckIn(device_id=name, platform="python")))
    transport.join(timeout=10)
    service.request_rounds(experiment_id, 1)

    for step in (1.0, 6.0, 7.0, 31.0, 32.0, 37.0):
        clock.now = clock.start + step
        service.tick()
    transport.join(timeout=10)

    kinds = [type(m).__name__ for m in control]
    # t=0 announce, t=6 re-announce, t=31 close; no worker reported anything, so
    # nobody's partial is awaited: combine at once, and again at t=37 (t=1, 7, 32: too soon)
    assert kinds == ["RoundOpened", "RoundOpened", "CloseRound", "CombineRound", "CombineRound"]
    assert all(isinstance(m, RoundOpened | CloseRound | CombineRound) for m in control)
    assert all(m.round == 1 for m in control)  # type: ignore[attr-defined]

    abandoned = RoundAbandoned(experiment_id=experiment_id, round=1, reason="no reports")
    transport.publish(TOPICS.events(experiment_id), sign(abandoned))
    transport.join(timeout=10)
    clock.now += 60
    service.tick()
    transport.join(timeout=10)

    assert len(control) == 5  # the outcome arrived: nothing more is sent
    assert service.rounds(experiment_id)[0].state == "abandoned"
    transport.close()
    db.close()
