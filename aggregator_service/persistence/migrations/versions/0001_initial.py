"""Experiments, rounds and devices.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the three tables of the first schema."""
    op.create_table(
        "experiments",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("model_version", sa.Integer, nullable=False),
        sa.Column("current_round", sa.Integer, nullable=False),
        sa.Column("rounds_requested", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("experiment_id", sa.String(64), sa.ForeignKey("experiments.id"), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("base_version", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer),
        sa.Column("selected", sa.JSON, nullable=False),
        sa.Column("reported", sa.Integer, nullable=False),
        sa.Column("accepted", sa.JSON, nullable=False),
        sa.Column("accepted_devices", sa.JSON, nullable=False),
        sa.Column("rejected", sa.JSON, nullable=False),
        sa.Column("dropped", sa.Integer, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("deadline_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float),
        sa.UniqueConstraint("experiment_id", "number", name="uq_round_number"),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("token_sha256", sa.String(64)),
        sa.Column("registered_at", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float),
        sa.Column("rounds_served", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    """Drop the tables."""
    op.drop_table("devices")
    op.drop_table("rounds")
    op.drop_table("experiments")
