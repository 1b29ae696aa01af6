"""After a restart, the next cohort is drawn only once the devices online before it are back.

Otherwise the first devices to check in again would make up the pool, and
the run would no longer draw the cohort the uninterrupted run draws.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from aggregator_service import Database, RoundService
from broker import CheckIn, MemoryTransport
from model_store import LocalStore
from tests.clocks import Clock
from tests.identities import TOPICS, device, round_service, sign

DEVICES = [f"dev-{i}" for i in range(4)]


def _check_in(transport: MemoryTransport, *names: str) -> None:
    for name in names:
        transport.publish(TOPICS.checkin(name), sign(CheckIn(device_id=name, platform="python")))
    transport.join(timeout=10)


def _before_the_crash(tmp_path: Path, small_config: Any, clock: Clock) -> tuple[Database, str]:
    """Run a service whose four devices are online, then drop it (its database stays)."""
    db = Database(f"sqlite:///{tmp_path / 'fedmq.db'}")
    transport = MemoryTransport()
    service = round_service(transport, LocalStore(tmp_path / "store"), db, clock=clock)
    service.start()
    for name in DEVICES:
        key = device(name).public_key_text
        service.register_device("python", public_key=key, device_id=name)
    _check_in(transport, *DEVICES)
    # The service's ticker (four times a second) writes the last-seen times of
    # devices that came online: a crash before that tick would lose them.
    service.tick()
    rounds = {"devices_per_round": 2, "min_reports": 2, "count": 1, "over_selection": 1.0}
    config = small_config(data={"devices": 4}, rounds=rounds)
    experiment_id = service.create_experiment(config)
    transport.close()
    return db, experiment_id


def _restarted(
    tmp_path: Path, db: Database, clock: Clock, grace_s: float
) -> tuple[RoundService, MemoryTransport]:
    transport = MemoryTransport()
    service = round_service(transport, LocalStore(tmp_path / "store"), db, clock=clock)
    service.start(recovery_grace_s=grace_s)
    return service, transport


def test_no_cohort_is_drawn_until_every_device_seen_before_the_restart_is_back(
    tmp_path: Path, small_config: Any
) -> None:
    clock = Clock()
    db, experiment_id = _before_the_crash(tmp_path, small_config, clock)
    clock.now += 5  # the restart
    service, transport = _restarted(tmp_path, db, clock, grace_s=60)

    service.request_rounds(experiment_id, 1)
    _check_in(transport, *DEVICES[:3])  # enough for the cohort of 2, but one is missing

    assert db.experiment(experiment_id).state == "waiting"
    assert db.rounds(experiment_id) == []
    _check_in(transport, DEVICES[3])
    (first,) = db.rounds(experiment_id)
    # The cohort the uninterrupted run draws: from all four, by the seed and round.
    seed = db.experiment(experiment_id).config["seed"]
    drawn = np.random.default_rng([seed, 1]).choice(sorted(DEVICES), size=2, replace=False)
    assert first.selected == tuple(str(d) for d in drawn)
    assert db.experiment(experiment_id).state == "running"
    transport.close()


def test_the_wait_is_bounded_by_the_grace_period(tmp_path: Path, small_config: Any) -> None:
    clock = Clock()
    db, experiment_id = _before_the_crash(tmp_path, small_config, clock)
    service, transport = _restarted(tmp_path, db, clock, grace_s=60)
    service.request_rounds(experiment_id, 1)
    _check_in(transport, *DEVICES[:2])  # two never come back

    clock.now += 59
    service.tick()
    transport.join(timeout=10)
    assert db.rounds(experiment_id) == []
    clock.now += 2
    service.tick()
    transport.join(timeout=10)
    assert len(db.rounds(experiment_id)) == 1
    transport.close()


def test_a_first_start_or_a_zero_grace_waits_for_nobody(tmp_path: Path, small_config: Any) -> None:
    clock = Clock()
    db, experiment_id = _before_the_crash(tmp_path, small_config, clock)
    service, transport = _restarted(tmp_path, db, clock, grace_s=0)
    service.request_rounds(experiment_id, 1)
    _check_in(transport, *DEVICES[:2])

    assert len(db.rounds(experiment_id)) == 1
    transport.close()
