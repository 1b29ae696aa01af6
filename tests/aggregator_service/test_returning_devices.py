"""Devices that die without a word, and come back: the online pool and the rounds keep up.

A device killed where no last will reaches the coordinator (AMQP has none)
goes silent; one that promised heartbeats is taken for gone after three
missed beats, so no later cohort is drawn with it. A device that restarts
during a round it was selected for has lost its task with its memory (and,
over AMQP, with its queue): the coordinator sends it the task again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aggregator_service import Database, RoundService
from broker import CheckIn, MemoryTransport
from broker.messages import Scalar
from device_sdk.emulator import Fleet, device_name
from model_store import LocalStore
from tests.clocks import Clock
from tests.identities import TOPICS, aggregator, device, enroll_in, round_service, sign


@dataclass
class Bench:
    transport: MemoryTransport
    service: RoundService
    store: LocalStore
    clock: Clock

    def check_in(self, name: str, experiment_id: str | None = None, **caps: Scalar) -> None:
        """Publish ``name``'s signed check-in with ``caps`` and let the coordinator read it."""
        message = CheckIn(
            device_id=name, platform="emulated", experiment_id=experiment_id, capabilities=caps
        )
        self.transport.publish(TOPICS.checkin(name), sign(message, device(name)))
        self.transport.join(timeout=30)

    def later(self, seconds: float) -> None:
        """Move the coordinator's clock on and let it tick."""
        self.clock.now += seconds
        self.service.tick()
        self.transport.join(timeout=60)


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    transport, clock = MemoryTransport(), Clock()
    store = LocalStore(tmp_path / "store")
    db = Database("sqlite://")
    service = round_service(transport, store, db, clock=clock)
    service.start()
    yield Bench(transport, service, store, clock)
    service.close()
    transport.close()
    db.close()


def test_a_device_that_misses_three_promised_heartbeats_leaves_the_pool(bench: Bench) -> None:
    for name in ("beating", "silent", "promised-nothing"):
        enroll_in(bench.service)(device(name), "emulated")
    bench.check_in("beating", heartbeat_s=10)
    bench.check_in("silent", heartbeat_s=10)
    bench.check_in("promised-nothing")

    bench.later(20)
    bench.check_in("beating", heartbeat_s=10)  # in time: its next 30 s start now
    assert bench.service.online_devices() == {"beating", "silent", "promised-nothing"}

    bench.later(11)  # 31 s after the silent device's last check-in

    assert bench.service.online_devices() == {"beating", "promised-nothing"}
    bench.later(20)  # the beating device is 31 s silent too
    assert bench.service.online_devices() == {"promised-nothing"}
    bench.check_in("silent", heartbeat_s=10)  # back: online again
    assert bench.service.online_devices() == {"silent", "promised-nothing"}


def test_a_promise_of_no_time_or_forever_is_held_to_the_range(bench: Bench) -> None:
    for name in ("hasty", "endless", "nonsense"):
        enroll_in(bench.service)(device(name), "emulated")
    bench.check_in("hasty", heartbeat_s=1e-9)  # counts as 10 s: gone after 30
    bench.check_in("endless", heartbeat_s=1e300)  # counts as a day
    bench.check_in("nonsense", heartbeat_s="soon")  # no promise at all

    bench.later(29)  # a coordinator's stall of seconds takes no device for gone
    assert bench.service.online_devices() == {"hasty", "endless", "nonsense"}
    bench.later(2)
    assert bench.service.online_devices() == {"endless", "nonsense"}
    bench.later(3 * 86_400 + 1)
    assert bench.service.online_devices() == {"nonsense"}


def _fleet(bench: Bench, config: Any, experiment_id: str, indices: range) -> Fleet:
    fleet = Fleet(
        lambda _id, _will: bench.transport,
        config.to_dict()["data"],
        seed=config.seed,
        indices=indices,
        experiment_id=experiment_id,
        enroll=enroll_in(bench.service),
        identities=device,
    )
    fleet.start()
    return fleet


def test_a_device_restarted_during_its_round_gets_its_task_again(
    bench: Bench, small_config: Any
) -> None:
    aggregator(bench.transport, bench.store).start()
    config = small_config(rounds={"devices_per_round": 6, "min_reports": 4, "count": 1})
    experiment_id = bench.service.create_experiment(config)
    live = _fleet(bench, config, experiment_id, range(4))
    # Devices 4 and 5 check in from processes that die before their task arrives.
    for index in (4, 5):
        name = device_name(index)
        enroll_in(bench.service)(device(name), "emulated")
        bench.check_in(name, experiment_id, started_at=1.0)
    bench.service.request_rounds(experiment_id, 1)
    bench.transport.join(timeout=60)  # devices 0-3 report; 4 and 5 never got their tasks

    bench.clock.now += 1
    restarted = _fleet(bench, config, experiment_id, range(4, 5))  # device 4 starts again
    bench.transport.join(timeout=60)
    bench.later(4)  # not yet: an update it sent before a restart would be counted by now
    assert restarted.summary()["tasks"] == 0
    bench.later(2)
    assert restarted.summary()["tasks"] == 1
    bench.later(config.rounds.deadline_s)
    live.stop()
    restarted.stop()

    (record,) = bench.service.rounds(experiment_id)
    assert record.state == "committed"
    assert (record.reported, len(record.accepted), record.dropped) == (5, 5, 1)
    assert restarted.summary()["updates_sent"] == 1
