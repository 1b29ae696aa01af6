"""The coordinator re-announces training rounds and re-sends overdue closes until an outcome."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aggregator_service import Database, RoundService
from broker import (
    CheckIn,
    CloseRound,
    Delivery,
    MemoryTransport,
    Message,
    RoundAbandoned,
    RoundOpened,
    decode,
    encode,
    topics,
)
from model_store import LocalStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rounds_are_reannounced_and_closed_after_the_deadline(
    tmp_path: Path, small_config: Any
) -> None:
    transport, clock = MemoryTransport(), Clock()
    db = Database("sqlite://")
    service = RoundService(transport, LocalStore(tmp_path), db, clock=clock)
    service.start()
    control: list[Message] = []

    def record(delivery: Delivery) -> None:
        control.append(decode(delivery.body))
        delivery.ack()

    transport.subscribe(topics.ALL_CONTROL, record)
    config = small_config(rounds={"deadline_s": 30.0})
    experiment_id = service.create_experiment(config)
    for i in range(6):
        transport.publish(topics.CHECKINS, encode(CheckIn(device_id=f"d{i}", platform="python")))
    transport.join(timeout=10)
    service.request_rounds(experiment_id, 1)

    for step in (1.0, 6.0, 7.0, 31.0, 32.0, 37.0):
        clock.now = 1000.0 + step
        service.tick()
    transport.join(timeout=10)

    kinds = [type(m).__name__ for m in control]
    # t=0 announce, t=6 re-announce, t=31 close, t=37 close again (t=1, 7, 32: too soon)
    assert kinds == ["RoundOpened", "RoundOpened", "CloseRound", "CloseRound"]
    assert all(isinstance(m, RoundOpened | CloseRound) and m.round == 1 for m in control)

    abandoned = RoundAbandoned(experiment_id=experiment_id, round=1, reason="no reports")
    transport.publish(topics.events(experiment_id), encode(abandoned))
    transport.join(timeout=10)
    clock.now += 60
    service.tick()
    transport.join(timeout=10)

    assert len(control) == 4  # the outcome arrived: nothing more is sent
    assert service.rounds(experiment_id)[0].state == "abandoned"
    transport.close()
    db.close()
