"""Schema migrations with Alembic: a database is brought to the newest revision on open."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

MIGRATIONS = Path(__file__).with_name("migrations")


def _config(connection: Connection) -> Config:
    """Return an Alembic config that runs on ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def upgrade(connection: Connection, revision: str = "head") -> None:
    """Migrate the database to ``revision`` (the newest by default)."""
    command.upgrade(_config(connection), revision)


def downgrade(connection: Connection, revision: str) -> None:
    """Migrate the database back to ``revision`` (``base`` drops everything)."""
    command.downgrade(_config(connection), revision)


def head() -> str:
    """Return the newest revision id."""
    revision = ScriptDirectory.from_config(_config(None)).get_current_head()  # type: ignore[arg-type]
    assert revision is not None
    return revision
