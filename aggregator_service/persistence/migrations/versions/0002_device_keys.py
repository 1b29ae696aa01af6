"""Device identities: each device's Ed25519 public key and when it was revoked.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the public key and revocation time of each device."""
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("public_key", sa.String(64)))
        batch.add_column(sa.Column("revoked_at", sa.Float))


def downgrade() -> None:
    """Drop the device identity columns."""
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("revoked_at")
        batch.drop_column("public_key")
