"""Round list lengths: how many devices a round selected and how many updates it accepted.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_ROUNDS = sa.table(
    "rounds",
    sa.column("id", sa.Integer),
    sa.column("selected", sa.JSON),
    sa.column("accepted", sa.JSON),
    sa.column("selected_count", sa.Integer),
    sa.column("accepted_count", sa.Integer),
)


def upgrade() -> None:
    """Add the two counts and fill them in from the rounds already recorded."""
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(
            sa.Column("selected_count", sa.Integer, nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("accepted_count", sa.Integer, nullable=False, server_default="0")
        )
    conn = op.get_bind()
    rows = conn.execute(sa.select(_ROUNDS.c.id, _ROUNDS.c.selected, _ROUNDS.c.accepted)).all()
    for row_id, selected, accepted in rows:
        conn.execute(
            sa.update(_ROUNDS)
            .where(_ROUNDS.c.id == row_id)
            .values(selected_count=len(selected or ()), accepted_count=len(accepted or ()))
        )


def downgrade() -> None:
    """Drop the counts."""
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("accepted_count")
        batch.drop_column("selected_count")
