"""The coordinator at fleet scale: a heartbeat costs no database write, big rounds serve small.

A fleet re-sends a signed check-in every heartbeat; 10,000 devices beating
every 30 s must not be 333 database writes a second. Their last-seen times
are written in batches (within ``RoundService.SEEN_EVERY_S``, a device coming
online at the next tick, everything on ``close``), and a round of a
1,000-device cohort is listed by counts, its ids paged on request.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine

from aggregator_service import Database, RoundService
from aggregator_service.api.app import create_app
from aggregator_service.persistence import DatabaseError
from aggregator_service.rounds.pool import ANY, LastSeen, OnlinePool
from aggregator_service.versions import write_version
from broker import CheckIn, CheckOut, Delivery, MemoryTransport, RoundCommitted, decode_weights
from model_store import LocalStore
from tests.brokers import require
from tests.clocks import Clock
from tests.identities import TOPICS, device, round_service, sign

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
VIEWER = {"Authorization": "Bearer scale-viewer"}
ROUNDS_BYTES_PER_ROUND = 2_000
"""What one round of a 1,000-device cohort may take in ``GET /experiments/<id>/rounds``."""


@dataclass
class Statements:
    """Every SQL statement any engine runs while it listens."""

    seen: list[str] = field(default_factory=list)

    def __call__(self, *args: Any) -> None:
        self.seen.append(str(args[2]).lstrip().split(None, 1)[0].upper())

    @property
    def writes(self) -> list[str]:
        return [s for s in self.seen if s in ("INSERT", "UPDATE", "DELETE")]


@pytest.fixture
def statements() -> Iterator[Statements]:
    counted = Statements()
    event.listen(Engine, "before_cursor_execute", counted)
    yield counted
    event.remove(Engine, "before_cursor_execute", counted)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'fedmq.db'}")
        yield database
        database.close()
        return
    require(5432, "PostgreSQL")
    schema = f"fedmq_scale_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    database = Database(f"{PG}?options=-csearch_path%3D{schema}")
    yield database
    database.close()
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@dataclass
class Coordinator:
    transport: MemoryTransport
    service: RoundService
    db: Database
    clock: Clock
    store: LocalStore

    def register(self, *names: str) -> None:
        for name in names:
            key = device(name).public_key_text
            self.service.register_device("python", public_key=key, device_id=name)

    def check_in(self, *names: str) -> None:
        for name in names:
            message = CheckIn(device_id=name, platform="python")
            self.transport.publish(TOPICS.checkin(name), sign(message))
        self.transport.join(timeout=60)

    def last_seen(self, name: str) -> float | None:
        (record,) = [d for d in self.db.devices() if d.id == name]
        return record.last_seen


@pytest.fixture
def coordinator(db: Database, tmp_path: Path) -> Iterator[Coordinator]:
    transport, clock = MemoryTransport(), Clock()
    store = LocalStore(tmp_path / "store")
    service = round_service(transport, store, db, clock=clock)
    service.start()
    yield Coordinator(transport, service, db, clock, store)
    transport.close()


def test_a_heartbeat_of_a_device_already_online_costs_no_database_statement(
    coordinator: Coordinator, statements: Statements
) -> None:
    names = [f"beat-{i}" for i in range(5)]
    coordinator.register(*names)
    coordinator.check_in(*names)  # coming online: news, written at the next tick
    coordinator.service.tick()
    statements.seen.clear()

    for _ in range(3):
        # Past the interval a last-seen may wait: a write per stale heartbeat would show.
        coordinator.clock.now += 3 * RoundService.SEEN_EVERY_S
        coordinator.check_in(*names)

    assert statements.seen == []
    coordinator.service.tick()  # the batch: one statement for every device
    assert statements.writes == ["UPDATE"]
    assert coordinator.last_seen(names[0]) == coordinator.clock.now


def test_last_seen_is_written_within_the_interval_and_on_close(
    coordinator: Coordinator,
) -> None:
    clock, service = coordinator.clock, coordinator.service
    coordinator.register("dev-a")
    came_online = clock.now
    coordinator.check_in("dev-a")
    assert coordinator.last_seen("dev-a") is None  # not before the next tick
    service.tick()
    assert coordinator.last_seen("dev-a") == came_online

    clock.now += 1
    beat = clock.now
    coordinator.check_in("dev-a")
    service.tick()
    # Not written yet, but the device table already shows it.
    assert coordinator.last_seen("dev-a") == came_online
    assert [d.last_seen for d in service.devices()] == [beat]
    clock.now = came_online + RoundService.SEEN_EVERY_S
    service.tick()
    assert coordinator.last_seen("dev-a") == beat

    clock.now += 1
    coordinator.check_in("dev-a")
    service.close()
    assert coordinator.last_seen("dev-a") == clock.now


def test_a_check_out_leaves_the_pool_and_coming_back_is_news() -> None:
    pool = OnlinePool()

    assert pool.check_in("b", ANY) and pool.check_in("a", "exp-1") and pool.check_in("c", ANY)
    assert not pool.check_in("c", ANY)  # a heartbeat
    assert pool.pool("exp-1") == ["a", "b", "c"] and pool.pool("exp-2") == ["b", "c"]
    assert pool.count("exp-1") == 3 and pool.count(ANY) == 2
    assert pool.check_in("a", "exp-2")  # another experiment: news
    assert pool.pool("exp-1") == ["b", "c"] and pool.pool("exp-2") == ["a", "b", "c"]
    assert pool.check_out("b") and not pool.check_out("b")
    assert pool.pool("exp-2") == ["a", "c"] and len(pool) == 2 and "b" not in pool
    assert pool.check_in("b", ANY)


class FlakyDatabase:
    """Refuses the first write, then records what it is given."""

    def __init__(self) -> None:
        self.refuse = True
        self.written: dict[str, float] = {}

    def devices_seen(self, seen: dict[str, float]) -> None:
        if self.refuse:
            self.refuse = False
            raise DatabaseError("the database is away")
        self.written.update(seen)


def test_last_seen_times_the_database_refuses_are_written_at_the_next_flush() -> None:
    db = FlakyDatabase()
    seen = LastSeen(db, every_s=10.0, now=0.0)  # type: ignore[arg-type]
    seen.seen("a", 1.0, news=True)
    seen.seen("b", 1.0)

    assert seen.due(0.25) and seen.flush(0.25) == 0  # refused: kept
    seen.seen("a", 2.0)
    assert not seen.due(5.0)  # a heartbeat is no news: it waits for the interval
    assert seen.due(10.25) and seen.flush(10.25) == 2
    assert db.written == {"a": 2.0, "b": 1.0} and seen.pending("a") is None
    assert not seen.due(30.0)  # nothing pending


def _fleet(size: int) -> list[str]:
    names = [f"fleet-{i:05d}" for i in range(size)]
    for name in names:
        device(name)  # keys made before the clock matters
    return names


@pytest.fixture
def sqlite_coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    db = Database(f"sqlite:///{tmp_path / 'fedmq.db'}")
    transport, clock = MemoryTransport(), Clock()
    store = LocalStore(tmp_path / "store")
    service = round_service(transport, store, db, clock=clock)
    service.start()
    yield Coordinator(transport, service, db, clock, store)
    transport.close()
    db.close()


def test_a_cohort_of_1000_from_3000_devices_is_drawn_steered_and_served_small(
    sqlite_coordinator: Coordinator, small_config: Any
) -> None:
    coordinator, service = sqlite_coordinator, sqlite_coordinator.service
    names = _fleet(3_000)
    coordinator.register(*names)
    steered: list[str] = []
    coordinator.transport.subscribe(TOPICS.all_devices, _counting(steered))
    coordinator.check_in(*names)
    rounds = {"devices_per_round": 1_000, "over_selection": 1.0, "min_reports": 500}
    model = {"input_shape": [784]}  # mnist-shaped: 3,000 parts of its 60,000 examples
    config = small_config(model=model, data={"dataset": "mnist", "devices": 3_000}, rounds=rounds)
    experiment_id = service.create_experiment(config)

    service.request_rounds(experiment_id, 1)
    coordinator.transport.join(timeout=60)

    (record,) = service.rounds(experiment_id)
    drawn = np.random.default_rng([config.seed, 1]).choice(sorted(names), 1_000, replace=False)
    assert record.selected == tuple(str(d) for d in drawn)
    assert len(steered) == 3_000  # 1,000 tasks and 2,000 come-back-laters, one per device
    assert len(set(steered)) == 3_000
    _commit(coordinator, experiment_id, record.selected)

    app = create_app({"TESTING": True, "VIEWER_TOKEN": "scale-viewer"}, service=service)
    with app.test_client() as client:
        _served_small(client, experiment_id, record.selected)


def _counting(into: list[str]) -> Any:
    def handler(delivery: Delivery) -> None:
        into.append(delivery.topic.rsplit("/", 1)[1])
        delivery.ack()

    return handler


def _commit(coordinator: Coordinator, experiment_id: str, selected: tuple[str, ...]) -> None:
    """Record a worker's commit of round 1 in which every selected device was accepted."""
    store = coordinator.store
    manifest = store.get_manifest(experiment_id, 0)
    base = decode_weights(store.get_blob(manifest.artifacts["weights.safetensors"].sha256))
    commit = RoundCommitted(
        experiment_id=experiment_id,
        round=1,
        version=1,
        model=write_version(store, experiment_id, 0, 1, base, {}),
        reported=len(selected),
        accepted=tuple(f"update-{i:04d}" for i in range(len(selected))),
        accepted_devices=tuple(sorted(selected)),
    )
    coordinator.transport.publish(TOPICS.events(experiment_id), sign(commit))
    coordinator.transport.join(timeout=60)
    assert coordinator.service.experiment(experiment_id).model_version == 1


def _served_small(client: FlaskClient, experiment_id: str, selected: tuple[str, ...]) -> None:
    response = client.get(f"/api/v1/experiments/{experiment_id}/rounds", headers=VIEWER)
    (listed,) = response.json["rounds"]  # type: ignore[index]
    assert len(response.data) < ROUNDS_BYTES_PER_ROUND
    assert (listed["state"], listed["selected"], listed["accepted"]) == ("committed", 1000, 1000)
    assert listed["selected_devices"] is None and listed["accepted_updates"] is None

    pages, offset = [], 0
    while offset is not None:
        path = f"/api/v1/experiments/{experiment_id}/rounds/1/devices?offset={offset}&limit=300"
        page = client.get(path, headers=VIEWER).json
        pages.append(page)
        offset = page["next_offset"]  # type: ignore[index]
    assert len(pages) == 4
    assert tuple(d["id"] for p in pages for d in p["devices"]) == selected
    assert all(d["accepted"] for p in pages for d in p["devices"])
    assert len({u for p in pages for u in p["accepted_updates"]}) == 1000

    first = client.get("/api/v1/devices?limit=100", headers=VIEWER).json
    assert len(first["devices"]) == 100 and first["next_after"] == "fleet-00099"  # type: ignore[index]
    assert first["counts"] == {"online": 3000, "offline": 0, "revoked": 0}  # type: ignore[index]
    rest = client.get("/api/v1/devices?limit=10000&after=fleet-00099", headers=VIEWER).json
    assert len(rest["devices"]) == 2900 and rest["next_after"] is None  # type: ignore[index]
    served = {d["id"]: d["rounds_served"] for d in rest["devices"]}  # type: ignore[index]
    assert sum(served.values()) == 1000 - sum(1 for d in selected if d <= "fleet-00099")


def test_a_small_round_lists_its_ids_inline_and_a_missing_round_is_404(
    coordinator: Coordinator, small_config: Any
) -> None:
    service = coordinator.service
    coordinator.register("d0", "d1", "d2", "d3")
    coordinator.check_in("d0", "d1", "d2", "d3")
    rounds = {"devices_per_round": 2, "over_selection": 1.0, "min_reports": 2}
    experiment_id = service.create_experiment(small_config(rounds=rounds))
    service.request_rounds(experiment_id, 1)

    app = create_app({"TESTING": True, "VIEWER_TOKEN": "scale-viewer"}, service=service)
    with app.test_client() as client:
        path = f"/api/v1/experiments/{experiment_id}/rounds"
        (listed,) = client.get(path, headers=VIEWER).json["rounds"]  # type: ignore[index]
        page = client.get(f"{path}/1/devices", headers=VIEWER).json
        missing = client.get(f"{path}/2/devices", headers=VIEWER)
        bad = client.get("/api/v1/devices?limit=0", headers=VIEWER)

    (record,) = service.rounds(experiment_id)
    assert listed["selected_devices"] == list(record.selected) and listed["selected"] == 2
    assert listed["accepted_updates"] == []
    assert [d["id"] for d in page["devices"]] == list(record.selected)  # type: ignore[index]
    assert page["next_offset"] is None  # type: ignore[index]
    assert missing.status_code == 404 and bad.status_code == 400
    (capped,) = coordinator.db.round_summaries(experiment_id, max_ids=1)
    assert (capped.selected, capped.selected_devices, capped.accepted_updates) == (2, None, ())


def test_a_device_checking_out_is_no_longer_in_the_pool(coordinator: Coordinator) -> None:
    coordinator.register("leaver")
    coordinator.check_in("leaver")
    message = CheckOut(device_id="leaver", reason="stopped")
    coordinator.transport.publish(TOPICS.checkin("leaver"), sign(message))
    coordinator.transport.join(timeout=10)

    assert coordinator.service.online_devices() == frozenset()
    assert coordinator.service.device_counts() == {"online": 0, "offline": 1, "revoked": 0}


def test_a_device_that_checked_in_before_registering_may_check_in_once_registered(
    coordinator: Coordinator,
) -> None:
    coordinator.check_in("early")  # an unknown sender: refused, and remembered as unknown
    coordinator.register("early")
    coordinator.check_in("early")

    assert coordinator.service.online_devices() == frozenset({"early"})


def test_round_record_json_of_a_full_record_keeps_every_id() -> None:
    """``describe`` without a limit (results files) lists every id, as before."""
    from aggregator_service.persistence import RoundRecord
    from aggregator_service.rounds import describe

    record = RoundRecord(
        experiment_id="e",
        number=1,
        state="committed",
        base_version=0,
        version=1,
        selected=tuple(f"d{i}" for i in range(1000)),
        reported=1000,
        accepted=tuple(f"u{i}" for i in range(1000)),
        accepted_devices=(),
        rejected={},
        dropped=0,
        metrics={},
        reason=None,
        started_at=0.0,
        deadline_at=1.0,
        ended_at=1.0,
    )

    assert len(describe(record)["selected_devices"]) == 1000
    capped = describe(record, max_ids=100)
    assert capped["selected_devices"] is None and capped["selected"] == 1000
    assert len(json.dumps(capped)) < 500
