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


def test_rounds_recorded_before_the_counts_get_them_from_their_lists() -> None:
    engine = create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )
    with engine.begin() as conn:
        migrate.upgrade(conn, "0002")
        conn.execute(
            text(
                "INSERT INTO experiments (id, name, config, state, model_version, current_round,"
                " rounds_requested, created_at) VALUES ('e', 'n', '{}', 'idle', 1, 1, 1, 0)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO rounds (experiment_id, number, state, base_version, selected,"
                " reported, accepted, accepted_devices, rejected, dropped, metrics, started_at,"
                " deadline_at) VALUES ('e', 1, 'committed', 0, '[\"a\", \"b\", \"c\"]', 2,"
                " '[\"u1\", \"u2\"]', '[\"a\", \"b\"]', '{}', 1, '{}', 0, 1)"
            )
        )
        migrate.upgrade(conn)
        counts = conn.execute(text("SELECT selected_count, accepted_count FROM rounds")).one()
        migrate.downgrade(conn, "0002")
        columns = {c["name"] for c in inspect(conn).get_columns("rounds")}

    assert tuple(counts) == (3, 2)
    assert "selected_count" not in columns
