"""The service's persistence on SQLite and on the machine's PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from aggregator_service import Database, NotFound
from aggregator_service.persistence import ExperimentRecord, RoundRecord
from tests.brokers import require

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[Database]:
    if request.param == "sqlite":
        database = Database("sqlite://")
        yield database
        database.close()
        return
    require(5432, "PostgreSQL")
    schema = f"fedmq_test_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    database = Database(f"{PG}?options=-csearch_path%3D{schema}")
    yield database
    database.close()
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def _experiment(experiment_id: str = "exp-1") -> ExperimentRecord:
    return ExperimentRecord(
        id=experiment_id,
        name="n",
        config={"model": {"zoo": "mlp"}, "seed": 3},
        state="idle",
        model_version=0,
        current_round=0,
        rounds_requested=0,
        created_at=1.5,
    )


def _round(number: int) -> RoundRecord:
    return RoundRecord(
        experiment_id="exp-1",
        number=number,
        state="training",
        base_version=number - 1,
        version=None,
        selected=("a", "b"),
        reported=0,
        accepted=(),
        accepted_devices=(),
        rejected={},
        dropped=0,
        metrics={},
        reason=None,
        started_at=10.0,
        deadline_at=70.0,
        ended_at=None,
    )


def test_experiments_round_trip_and_update(db: Database) -> None:
    db.add_experiment(_experiment())

    db.update_experiment("exp-1", state="running", rounds_requested=4)

    stored = db.experiment("exp-1")
    assert stored.config == {"model": {"zoo": "mlp"}, "seed": 3}
    assert (stored.state, stored.rounds_requested) == ("running", 4)
    assert [e.id for e in db.experiments()] == ["exp-1"]
    with pytest.raises(NotFound):
        db.experiment("nope")


def test_rounds_keep_their_lists_maps_and_order(db: Database) -> None:
    db.add_experiment(_experiment())
    db.add_round(_round(2))
    db.add_round(_round(1))

    db.update_round(
        "exp-1",
        1,
        state="committed",
        version=1,
        reported=2,
        accepted=("m1", "m2"),
        accepted_devices=("a", "b"),
        rejected={"stale": 1},
        metrics={"accuracy": 0.5},
        ended_at=12.5,
    )

    first, second = db.rounds("exp-1")
    assert (first.number, second.number) == (1, 2)
    assert first.accepted == ("m1", "m2") and first.selected == ("a", "b")
    assert first.rejected == {"stale": 1} and first.metrics == {"accuracy": 0.5}
    assert first.duration_s == pytest.approx(2.5)
    assert second.state == "training" and second.ended_at is None


def test_deleting_an_experiment_removes_its_rounds_and_only_its_own(db: Database) -> None:
    db.add_experiment(_experiment())
    db.add_experiment(_experiment("exp-2"))
    db.add_round(_round(1))
    db.add_round(_round(2))

    db.delete_experiment("exp-1")

    with pytest.raises(NotFound):
        db.experiment("exp-1")
    assert db.rounds("exp-1") == []
    assert [e.id for e in db.experiments()] == ["exp-2"]
    with pytest.raises(NotFound):
        db.delete_experiment("exp-1")


def test_devices_are_registered_seen_and_counted(db: Database) -> None:
    db.add_device("phone-1", "android", "ab" * 32, 1.0, public_key="key-1")
    db.add_device("emu-0001", "emulated", None, 2.0)
    db.device_seen("phone-1", 5.0)
    db.device_seen("emu-0001", 6.0)
    db.device_seen("stranger", 7.0)  # an unknown device is not registered by a check-in

    db.devices_served(["phone-1", "emu-0001", "stranger"])
    db.devices_served(["phone-1"])

    served = {d.id: (d.platform, d.last_seen, d.rounds_served) for d in db.devices()}
    assert served == {"phone-1": ("android", 5.0, 2), "emu-0001": ("emulated", 6.0, 1)}
    assert db.device("stranger") is None and db.count_devices() == 2


def test_a_device_record_keeps_its_key_and_revocation(db: Database) -> None:
    db.add_device("phone-1", "android", "ab" * 32, 1.0, public_key="key-1")

    db.update_device("phone-1", public_key="key-2", revoked_at=9.5)

    record = db.device("phone-1")
    assert record is not None
    assert (record.registered_at, record.public_key, record.revoked_at) == (1.0, "key-2", 9.5)
    assert (record.last_seen, record.rounds_served) == (None, 0)
    with pytest.raises(NotFound):
        db.update_device("nope", revoked_at=1.0)
