"""Devices that vanish without a word: the deadline closes the round, commit or abandon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aggregator_service import Database, RoundService
from aggregator_service.evaluation import held_out_evaluator
from broker import CheckIn, MemoryTransport
from device_sdk.emulator import Fleet, device_name
from model_store import LocalStore
from tests.clocks import Clock
from tests.identities import TOPICS, aggregator, device, enroll_in, round_service, sign


def _run(tmp_path: Path, config: Any, rounds: int) -> tuple[RoundService, str]:
    """Six devices online, two of which (a third) never answer; run ``rounds`` rounds."""
    transport = MemoryTransport()
    try:
        return _run_on(transport, tmp_path, config, rounds)
    finally:
        transport.close()


def _run_on(
    transport: MemoryTransport, tmp_path: Path, config: Any, rounds: int
) -> tuple[RoundService, str]:
    clock = Clock()
    store = LocalStore(tmp_path / "store")
    service = round_service(
        transport, store, Database("sqlite://"), clock=clock, evaluator_factory=held_out_evaluator
    )
    service.start()
    aggregator(transport, store).start()
    experiment_id = service.create_experiment(config)
    fleet = Fleet(
        lambda _id, _will: transport,
        config.to_dict()["data"],
        seed=config.seed,
        indices=range(4),
        experiment_id=experiment_id,
        enroll=enroll_in(service),
        identities=device,
    )
    fleet.start()
    for silent in (4, 5):
        name = device_name(silent)
        enroll_in(service)(device(name), "emulated")
        message = CheckIn(device_id=name, platform="emulated", experiment_id=experiment_id)
        transport.publish(TOPICS.checkin(name), sign(message))
    transport.join(timeout=30)
    service.request_rounds(experiment_id, rounds)
    for _ in range(rounds):
        transport.join(timeout=60)  # the four live devices report; the round waits
        clock.now += config.rounds.deadline_s + 1
        service.tick()  # the deadline passed: the coordinator closes the round
        transport.join(timeout=60)
    fleet.stop()
    return service, experiment_id


def test_a_round_missing_a_third_of_its_devices_commits_at_the_deadline(
    tmp_path: Path, small_config: Any
) -> None:
    config = small_config(rounds={"devices_per_round": 6, "min_reports": 4, "count": 2})

    service, experiment_id = _run(tmp_path, config, rounds=2)

    rounds = service.rounds(experiment_id)
    assert [(r.state, len(r.selected), r.reported, len(r.accepted), r.dropped) for r in rounds] == [
        ("committed", 6, 4, 4, 2),
        ("committed", 6, 4, 4, 2),
    ]
    assert service.experiment(experiment_id).model_version == 2


def test_a_round_below_its_minimum_is_abandoned_and_the_experiment_goes_on(
    tmp_path: Path, small_config: Any
) -> None:
    config = small_config(rounds={"devices_per_round": 6, "min_reports": 5, "count": 2})

    service, experiment_id = _run(tmp_path, config, rounds=2)

    first, second = service.rounds(experiment_id)
    assert first.state == "abandoned" and "only 4 valid update(s), 5 needed" in (first.reason or "")
    assert first.dropped == 2 and first.reported == 4
    # The next round starts again from the last committed version.
    assert second.number == 2 and second.base_version == 0
    assert service.experiment(experiment_id).model_version == 0
