"""The coordinator's asynchronous (FedBuff) rounds: C devices always busy, no cohort barrier."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator_service import Database, RoundService
from aggregator_service.versions import write_version
from broker import (
    CheckIn,
    CheckOut,
    Delivery,
    MemoryTransport,
    Message,
    RoundCommitted,
    RoundOpened,
    TrainTask,
    decode,
    decode_weights,
)
from model_store import LocalStore
from tests.clocks import Clock
from tests.identities import TOPICS, device, round_service, sign


@dataclass
class Coordinator:
    transport: MemoryTransport
    store: LocalStore
    db: Database
    clock: Clock
    service: RoundService
    experiment_id: str = ""
    tasks: list[TrainTask] = field(default_factory=list)
    control: list[Message] = field(default_factory=list)

    def check_in(self, device_id: str, busy: int = 0) -> None:
        message = CheckIn(
            device_id=device_id,
            platform="python",
            experiment_id=self.experiment_id or None,
            capabilities={"tasks_in_progress": busy},
        )
        self.transport.publish(TOPICS.checkin(device_id), sign(message))
        self.transport.join(timeout=10)

    def restart(self) -> dict[str, list[TrainTask]]:
        """Replace the coordinator by a new one on the same database (a new connection)."""
        self.transport.close()
        self.transport = MemoryTransport()
        tasks = _record(self)
        self.service = round_service(self.transport, self.store, self.db, clock=self.clock)
        self.service.start()
        self.service.tick()  # the first tick re-announces the rounds recovered
        self.transport.join(timeout=10)
        return tasks


Bench = tuple[Coordinator, dict[str, list[TrainTask]]]


@pytest.fixture
def fedbuff_bench(tmp_path: Path, small_config: Any) -> Iterator[Bench]:
    """A fedbuff experiment (K = 3) with C = 2 task slots and two devices online."""
    bench, tasks = _setup(tmp_path, small_config)
    yield bench, tasks
    bench.transport.close()  # the latest one: a restart replaces it
    bench.db.close()


def _setup(tmp_path: Path, small_config: Any) -> Bench:
    transport, clock, db = MemoryTransport(), Clock(), Database("sqlite://")
    store = LocalStore(tmp_path / "store")
    service = round_service(transport, store, db, clock=clock)
    service.start()
    bench = Coordinator(transport, store, db, clock, service)
    by_device = _record(bench)
    config = small_config(
        strategy={"name": "fedbuff", "buffer_size": 3},
        rounds={"devices_per_round": 2, "over_selection": 1.0, "min_reports": 1},
    )
    bench.experiment_id = service.create_experiment(config)
    for name in ("d0", "d1"):
        service.register_device("python", public_key=device(name).public_key_text, device_id=name)
        bench.check_in(name)
    return bench, by_device


def _record(bench: Coordinator) -> dict[str, list[TrainTask]]:
    """Record the tasks (by device) and control messages the coordinator sends."""
    by_device: dict[str, list[TrainTask]] = {}

    def on_device(delivery: Delivery) -> None:
        message = decode(delivery.body)
        if isinstance(message, TrainTask):
            bench.tasks.append(message)
            by_device.setdefault(delivery.topic.rsplit("/", 1)[-1], []).append(message)
        delivery.ack()

    def on_control(delivery: Delivery) -> None:
        bench.control.append(decode(delivery.body))
        delivery.ack()

    bench.transport.subscribe(f"{TOPICS.namespace}/device/+", on_device)
    bench.transport.subscribe(TOPICS.all_control, on_control)
    return by_device


def test_a_device_that_finishes_gets_its_next_task_at_once(fedbuff_bench: Bench) -> None:
    bench, tasks = fedbuff_bench
    bench.service.request_rounds(bench.experiment_id, 3)
    bench.transport.join(timeout=10)

    (opened,) = bench.control
    assert isinstance(opened, RoundOpened)
    assert (opened.round, opened.target_reports, opened.min_reports) == (1, 3, 1)
    assert {d: len(t) for d, t in tasks.items()} == {"d0": 1, "d1": 1}  # C = 2 slots

    bench.clock.now += 30
    bench.check_in("d0")  # d0 sent its update: it is idle, d1 still trains
    bench.check_in("d1", busy=1)  # a heartbeat of a device still training

    assert {d: len(t) for d, t in tasks.items()} == {"d0": 2, "d1": 1}
    assert tasks["d0"][1].round == 1 and tasks["d0"][1].base_version == 0
    (record,) = bench.service.rounds(bench.experiment_id)
    assert sorted(record.selected) == ["d0", "d0", "d1"]  # the round lists every task

    bench.clock.now += 31  # d1's task (t=0) passes its deadline; d0's second (t=30) does not
    bench.service.tick()
    bench.transport.join(timeout=10)
    assert {d: len(t) for d, t in tasks.items()} == {"d0": 2, "d1": 2}

    # A worker commits step 1 as v1 (updates from any task); step 2 opens on v1
    # while the tasks already out keep running: no barrier, no new tasks yet.
    new = {k: np.asarray(v) + 1 for k, v in _weights(bench).items()}
    ref = write_version(bench.store, bench.experiment_id, 0, 1, new, {})
    commit = RoundCommitted(
        experiment_id=bench.experiment_id,
        round=1,
        version=1,
        model=ref,
        reported=3,
        accepted=("u1", "u2", "u3"),
        accepted_devices=("d0", "d1"),
    )
    bench.transport.publish(TOPICS.events(bench.experiment_id), sign(commit))
    bench.transport.join(timeout=10)

    first, second = bench.service.rounds(bench.experiment_id)
    summary = (first.state, first.version, len(first.selected), first.dropped)
    assert summary == ("committed", 1, 4, 1)  # 4 tasks handed out, d1's first one dropped
    assert (second.number, second.state, second.base_version) == (2, "training", 1)
    assert len(bench.tasks) == 4
    bench.check_in("d0")
    assert tasks["d0"][-1].round == 2 and tasks["d0"][-1].base_version == 1


def test_a_restarted_coordinator_reannounces_the_step_and_refills_slots_at_check_ins(
    fedbuff_bench: Bench,
) -> None:
    bench, _ = fedbuff_bench
    bench.service.request_rounds(bench.experiment_id, 2)
    bench.transport.join(timeout=10)
    assert len(bench.tasks) == 2
    bench.control.clear()

    tasks = bench.restart()

    (repeated,) = bench.control
    assert isinstance(repeated, RoundOpened) and (repeated.round, repeated.target_reports) == (1, 3)
    assert tasks == {}  # the tasks in flight are not sent again
    bench.check_in("d0", busy=1)  # a heartbeat: still on its old task
    bench.check_in("d1", busy=1)
    assert tasks == {}
    bench.check_in("d0")  # done: its slot is free again
    assert [(t.round, t.base_version) for t in tasks["d0"]] == [(1, 0)]
    leaving = CheckOut(device_id="d1", reason="connection lost")
    bench.transport.publish(TOPICS.checkin("d1"), sign(leaving))
    bench.transport.join(timeout=10)
    assert set(tasks) == {"d0"}  # d1's slot frees, but no idle device is online
    assert bench.service.rounds(bench.experiment_id)[0].state == "training"


def _weights(bench: Coordinator) -> dict[str, Any]:
    manifest = bench.store.get_manifest(bench.experiment_id, 0)
    return decode_weights(bench.store.get_blob(manifest.artifacts["weights.safetensors"].sha256))
