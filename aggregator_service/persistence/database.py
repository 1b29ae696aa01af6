"""The service's state in any SQLAlchemy database (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from sqlalchemy import Connection, create_engine, delete, event, func, insert, select, update
from sqlalchemy.engine import Engine, RowMapping
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

from aggregator_service.errors import NotFound, ServiceError
from aggregator_service.persistence import migrate, schema
from aggregator_service.persistence.records import DeviceRecord, ExperimentRecord, RoundRecord


class DatabaseError(ServiceError):
    """The database refused or failed an operation."""

    code = "database_error"


class Database:
    """Reads and writes experiments, rounds and devices; one transaction per call."""

    def __init__(self, url: str) -> None:
        try:
            self._engine: Engine = _engine(url)
        except (SQLAlchemyError, ImportError) as exc:
            raise DatabaseError(f"cannot open database {url!r}: {exc}") from exc
        sqlite = self._engine.dialect.name == "sqlite"
        if sqlite:
            event.listen(self._engine, "connect", _sqlite_pragmas)
        self._lock: AbstractContextManager[Any] = threading.RLock() if sqlite else nullcontext()
        try:
            with self._engine.begin() as conn:
                migrate.upgrade(conn)
        except SQLAlchemyError as exc:
            raise DatabaseError(f"cannot migrate database {url!r}: {exc}") from exc

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        # SQLite serialises writers anyway, and an in-memory database is one
        # connection shared by every thread: one transaction at a time.
        with self._lock:
            try:
                with self._engine.begin() as conn:
                    yield conn
            except SQLAlchemyError as exc:
                raise DatabaseError(str(exc)) from exc

    def ping(self) -> None:
        """Ask the database something trivial; raise ``DatabaseError`` if it does not answer."""
        with self._tx() as conn:
            conn.execute(select(1))

    def close(self) -> None:
        """Release pooled connections."""
        self._engine.dispose()

    def add_experiment(self, record: ExperimentRecord) -> None:
        """Insert a new experiment."""
        with self._tx() as conn:
            conn.execute(insert(schema.experiments).values(**record.__dict__))

    def experiment(self, experiment_id: str) -> ExperimentRecord:
        """Return one experiment or raise ``NotFound``."""
        with self._tx() as conn:
            row = (
                conn.execute(
                    select(schema.experiments).where(schema.experiments.c.id == experiment_id)
                )
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(f"no experiment {experiment_id!r}")
        return ExperimentRecord(**row)

    def experiments(self) -> list[ExperimentRecord]:
        """Return every experiment, oldest first."""
        with self._tx() as conn:
            rows = conn.execute(
                select(schema.experiments).order_by(schema.experiments.c.created_at)
            ).mappings()
            return [ExperimentRecord(**row) for row in rows]

    def update_experiment(self, experiment_id: str, **values: Any) -> None:
        """Change some fields of an experiment."""
        with self._tx() as conn:
            conn.execute(
                update(schema.experiments)
                .where(schema.experiments.c.id == experiment_id)
                .values(**values)
            )

    def delete_experiment(self, experiment_id: str) -> None:
        """Remove an experiment and its rounds in one transaction, or raise ``NotFound``."""
        with self._tx() as conn:
            rounds = schema.rounds
            conn.execute(delete(rounds).where(rounds.c.experiment_id == experiment_id))
            done = conn.execute(
                delete(schema.experiments).where(schema.experiments.c.id == experiment_id)
            )
            if done.rowcount == 0:
                raise NotFound(f"no experiment {experiment_id!r}")

    def add_round(self, record: RoundRecord) -> None:
        """Insert a new round."""
        values = dict(record.__dict__)
        for key in ("selected", "accepted", "accepted_devices"):
            values[key] = list(values[key])
        with self._tx() as conn:
            conn.execute(insert(schema.rounds).values(**values))

    def update_round(self, experiment_id: str, number: int, **values: Any) -> None:
        """Change some fields of a round."""
        for key in ("selected", "accepted", "accepted_devices"):
            if key in values:
                values[key] = list(values[key])
        with self._tx() as conn:
            conn.execute(
                update(schema.rounds)
                .where(schema.rounds.c.experiment_id == experiment_id)
                .where(schema.rounds.c.number == number)
                .values(**values)
            )

    def rounds(self, experiment_id: str) -> list[RoundRecord]:
        """Return an experiment's rounds in order."""
        with self._tx() as conn:
            rows = conn.execute(
                select(schema.rounds)
                .where(schema.rounds.c.experiment_id == experiment_id)
                .order_by(schema.rounds.c.number)
            ).mappings()
            return [_round(row) for row in rows]

    def add_device(
        self,
        device_id: str,
        platform: str,
        token_sha256: str | None,
        now: float,
        *,
        public_key: str | None = None,
    ) -> None:
        """Register a device."""
        with self._tx() as conn:
            conn.execute(
                insert(schema.devices).values(
                    id=device_id,
                    platform=platform,
                    token_sha256=token_sha256,
                    registered_at=now,
                    last_seen=None,
                    rounds_served=0,
                    public_key=public_key,
                    revoked_at=None,
                )
            )

    def update_device(self, device_id: str, **values: Any) -> None:
        """Change a registered device's columns (key, token, revocation)."""
        with self._tx() as conn:
            done = conn.execute(
                update(schema.devices).where(schema.devices.c.id == device_id).values(**values)
            )
            if done.rowcount == 0:
                raise NotFound(f"no device {device_id}")

    def device(self, device_id: str) -> DeviceRecord | None:
        """Return one device, or None if it was never registered."""
        with self._tx() as conn:
            row = (
                conn.execute(select(schema.devices).where(schema.devices.c.id == device_id))
                .mappings()
                .first()
            )
            return None if row is None else _device(row)

    def count_devices(self) -> int:
        """Return how many devices are registered."""
        with self._tx() as conn:
            return int(conn.execute(select(func.count()).select_from(schema.devices)).scalar_one())

    def device_seen(self, device_id: str, now: float) -> None:
        """Record a registered device's check-in (an unknown id changes nothing)."""
        with self._tx() as conn:
            conn.execute(
                update(schema.devices).where(schema.devices.c.id == device_id).values(last_seen=now)
            )

    def devices_served(self, device_ids: Iterable[str]) -> None:
        """Count one more served round for each device."""
        ids = list(device_ids)
        if not ids:
            return
        with self._tx() as conn:
            conn.execute(
                update(schema.devices)
                .where(schema.devices.c.id.in_(ids))
                .values(rounds_served=schema.devices.c.rounds_served + 1)
            )

    def devices(self) -> list[DeviceRecord]:
        """Return every known device."""
        with self._tx() as conn:
            rows = conn.execute(select(schema.devices).order_by(schema.devices.c.id)).mappings()
            return [_device(r) for r in rows]


def _device(row: RowMapping) -> DeviceRecord:
    return DeviceRecord(
        row["id"],
        row["platform"],
        row["registered_at"],
        row["last_seen"],
        row["rounds_served"],
        row["public_key"],
        row["revoked_at"],
    )


def _engine(url: str) -> Engine:
    """Create the engine; an in-memory SQLite database is shared by all threads."""
    if url in ("sqlite://", "sqlite:///:memory:"):
        return create_engine(url, connect_args={"check_same_thread": False}, poolclass=StaticPool)
    return create_engine(url)


def _round(row: RowMapping) -> RoundRecord:
    """Build a round record from a row, turning JSON lists back into tuples."""
    values = dict(row)
    values.pop("id")
    for key in ("selected", "accepted", "accepted_devices"):
        values[key] = tuple(values[key])
    return RoundRecord(**values)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Use WAL so the API can read while the coordinator writes."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
