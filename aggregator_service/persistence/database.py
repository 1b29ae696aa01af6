"""The service's state in any SQLAlchemy database (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from sqlalchemy import (
    Connection,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    null,
    select,
    update,
)
from sqlalchemy.engine import Engine, RowMapping
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

from aggregator_service.errors import NotFound, ServiceError
from aggregator_service.persistence import migrate, schema
from aggregator_service.persistence.records import (
    DeviceRecord,
    ExperimentRecord,
    RoundRecord,
    RoundSummary,
)

_LISTS = ("selected", "accepted", "accepted_devices")
"""A round's columns that hold lists of ids (JSON)."""
_COUNTS = {"selected": "selected_count", "accepted": "accepted_count"}
"""The column that holds each listed column's length."""


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
            for table in (schema.rounds, schema.secagg_rounds, schema.secagg_frames):
                conn.execute(delete(table).where(table.c.experiment_id == experiment_id))
            done = conn.execute(
                delete(schema.experiments).where(schema.experiments.c.id == experiment_id)
            )
            if done.rowcount == 0:
                raise NotFound(f"no experiment {experiment_id!r}")

    def save_secagg_round(self, experiment_id: str, number: int, state: Mapping[str, Any]) -> None:
        """Write (or replace) a secure round's protocol state."""
        table = schema.secagg_rounds
        where = (table.c.experiment_id == experiment_id) & (table.c.number == number)
        with self._tx() as conn:
            conn.execute(delete(table).where(where))
            conn.execute(
                insert(table).values(experiment_id=experiment_id, number=number, state=dict(state))
            )

    def secagg_round(self, experiment_id: str, number: int) -> dict[str, Any] | None:
        """Return a secure round's protocol state, None if none was written."""
        table = schema.secagg_rounds
        where = (table.c.experiment_id == experiment_id) & (table.c.number == number)
        with self._tx() as conn:
            row = conn.execute(select(table.c.state).where(where)).first()
        return None if row is None else dict(row[0])

    def add_secagg_frame(
        self, experiment_id: str, number: int, device_id: str, kind: str, frame: bytes
    ) -> bool:
        """Keep a device's stage message; False if one of that kind was kept already."""
        table = schema.secagg_frames
        key = (
            (table.c.experiment_id == experiment_id)
            & (table.c.number == number)
            & (table.c.device_id == device_id)
            & (table.c.kind == kind)
        )
        with self._tx() as conn:
            if conn.execute(select(table.c.kind).where(key)).first() is not None:
                return False
            conn.execute(
                insert(table).values(
                    experiment_id=experiment_id,
                    number=number,
                    device_id=device_id,
                    kind=kind,
                    frame=frame,
                )
            )
        return True

    def secagg_frames(self, experiment_id: str, number: int) -> list[bytes]:
        """Return the device messages kept for a secure round."""
        table = schema.secagg_frames
        where = (table.c.experiment_id == experiment_id) & (table.c.number == number)
        with self._tx() as conn:
            rows = conn.execute(select(table.c.frame).where(where)).all()
        return [bytes(row[0]) for row in rows]

    def forget_secagg_round(self, experiment_id: str, number: int) -> None:
        """Delete a finished secure round's protocol state and messages."""
        with self._tx() as conn:
            for table in (schema.secagg_rounds, schema.secagg_frames):
                conn.execute(
                    delete(table)
                    .where(table.c.experiment_id == experiment_id)
                    .where(table.c.number == number)
                )

    def add_round(self, record: RoundRecord) -> None:
        """Insert a new round."""
        values = _listed(dict(record.__dict__))
        with self._tx() as conn:
            conn.execute(insert(schema.rounds).values(**values))

    def update_round(self, experiment_id: str, number: int, **values: Any) -> None:
        """Change some fields of a round."""
        values = _listed(values)
        with self._tx() as conn:
            conn.execute(
                update(schema.rounds)
                .where(schema.rounds.c.experiment_id == experiment_id)
                .where(schema.rounds.c.number == number)
                .values(**values)
            )

    def rounds(self, experiment_id: str) -> list[RoundRecord]:
        """Return an experiment's rounds in order, with every list of ids."""
        with self._tx() as conn:
            rows = conn.execute(
                select(schema.rounds)
                .where(schema.rounds.c.experiment_id == experiment_id)
                .order_by(schema.rounds.c.number)
            ).mappings()
            return [_round(row) for row in rows]

    def round_record(self, experiment_id: str, number: int) -> RoundRecord | None:
        """Return one round with its lists of ids (None: no such round)."""
        r = schema.rounds
        query = select(r).where(r.c.experiment_id == experiment_id).where(r.c.number == number)
        with self._tx() as conn:
            row = conn.execute(query).mappings().first()
            return None if row is None else _round(row)

    def last_round(self, experiment_id: str) -> RoundRecord | None:
        """Return an experiment's latest round with its lists of ids (None: none yet)."""
        r = schema.rounds
        query = select(r).where(r.c.experiment_id == experiment_id).order_by(r.c.number.desc())
        with self._tx() as conn:
            row = conn.execute(query.limit(1)).mappings().first()
            return None if row is None else _round(row)

    def round_summaries(self, experiment_id: str, *, max_ids: int) -> list[RoundSummary]:
        """Return an experiment's rounds in order, each list of ids only if at most ``max_ids``.

        Longer lists are never read back from the database.
        """
        r = schema.rounds
        scalars = [c for c in r.c if c.name not in ("id", *_LISTS)]
        query = (
            select(
                *scalars,
                case((r.c.selected_count <= max_ids, r.c.selected), else_=null()).label("ids"),
                case((r.c.accepted_count <= max_ids, r.c.accepted), else_=null()).label("updates"),
            )
            .where(r.c.experiment_id == experiment_id)
            .order_by(r.c.number)
        )
        with self._tx() as conn:
            return [_summary(row) for row in conn.execute(query).mappings()]

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

    def device_keys(self) -> dict[str, str | None]:
        """Return every device's public key (base64), None where revoked or keyless."""
        d = schema.devices
        query = select(d.c.id, d.c.public_key, d.c.revoked_at)
        with self._tx() as conn:
            return {
                str(device_id): None if revoked is not None else key
                for device_id, key, revoked in conn.execute(query)
            }

    def count_devices(self) -> int:
        """Return how many devices are registered."""
        with self._tx() as conn:
            return int(conn.execute(select(func.count()).select_from(schema.devices)).scalar_one())

    def device_seen(self, device_id: str, now: float) -> None:
        """Record a registered device's check-in (an unknown id changes nothing)."""
        self.devices_seen({device_id: now})

    def devices_seen(self, seen: Mapping[str, float]) -> None:
        """Record many devices' last check-ins in one statement (unknown ids change nothing)."""
        if not seen:
            return
        d = schema.devices
        statement = update(d).where(d.c.id == bindparam("device")).values(last_seen=bindparam("at"))
        with self._tx() as conn:
            conn.execute(statement, [{"device": k, "at": v} for k, v in seen.items()])

    def recently_seen(self, since: float) -> list[str]:
        """Return the unrevoked devices whose recorded last check-in is at ``since`` or later."""
        d = schema.devices
        query = select(d.c.id).where(d.c.revoked_at.is_(None)).where(d.c.last_seen >= since)
        with self._tx() as conn:
            return [str(device_id) for device_id in conn.execute(query).scalars()]

    def count_revoked(self) -> int:
        """Return how many registered devices are revoked."""
        d = schema.devices
        query = select(func.count()).select_from(d).where(d.c.revoked_at.is_not(None))
        with self._tx() as conn:
            return int(conn.execute(query).scalar_one())

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

    def devices(self, *, after: str | None = None, limit: int | None = None) -> list[DeviceRecord]:
        """Return the known devices by id: all, or ``limit`` of them with ids after ``after``."""
        d = schema.devices
        query = select(d).order_by(d.c.id)
        if after is not None:
            query = query.where(d.c.id > after)
        if limit is not None:
            query = query.limit(limit)
        with self._tx() as conn:
            return [_device(r) for r in conn.execute(query).mappings()]


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


def _listed(values: dict[str, Any]) -> dict[str, Any]:
    """Return a round's values with its lists of ids as JSON lists, and their counts beside."""
    for key in _LISTS:
        if key in values:
            values[key] = list(values[key])
            if key in _COUNTS:
                values[_COUNTS[key]] = len(values[key])
    return values


def _round(row: RowMapping) -> RoundRecord:
    """Build a round record from a row, turning JSON lists back into tuples."""
    values = dict(row)
    for key in ("id", *_COUNTS.values()):
        values.pop(key)
    for key in _LISTS:
        values[key] = tuple(values[key])
    return RoundRecord(**values)


def _summary(row: RowMapping) -> RoundSummary:
    """Build a round summary from a row of scalars and the lists short enough to read."""
    values = dict(row)
    values["selected"] = values.pop("selected_count")
    values["accepted"] = values.pop("accepted_count")
    ids, updates = values.pop("ids"), values.pop("updates")
    values["selected_devices"] = None if ids is None else tuple(ids)
    values["accepted_updates"] = None if updates is None else tuple(updates)
    return RoundSummary(**values)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Use WAL so the API can read while the coordinator writes."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
