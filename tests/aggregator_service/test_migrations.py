"""Schema migrations: the Alembic history builds exactly the schema the code uses."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import StaticPool

from aggregator_service import Database
from aggregator_service.persistence import migrate
from aggregator_service.persistence.schema import metadata


def test_a_new_database_is_migrated_to_head_and_matches_the_code() -> None:
    db = Database("sqlite://")
    engine = db._engine

    with engine.connect() as conn:
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        differences = compare_metadata(MigrationContext.configure(conn), metadata)

    assert version == migrate.head()
    assert differences == []
    db.close()


def test_migrating_again_is_a_no_op_and_downgrade_removes_the_schema() -> None:
    engine = create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )
    with engine.begin() as conn:
        migrate.upgrade(conn)
        migrate.upgrade(conn)
        assert {"experiments", "rounds", "devices"} <= set(inspect(conn).get_table_names())
        migrate.downgrade(conn, "base")
        assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
