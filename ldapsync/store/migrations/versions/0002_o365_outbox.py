"""The Microsoft 365 outbox: queue rows written in the same transaction as the directory change.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "o365_outbox",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("entry_uuid", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("secret", sa.Text, nullable=True),
        sa.Column("state", sa.String(16), nullable=False, server_default="ready"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.Float, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_until", sa.Float, nullable=True),
    )
    op.create_index("ix_o365_outbox_user", "o365_outbox", ["entry_uuid", "id"])
    op.create_index("ix_o365_outbox_due", "o365_outbox", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_table("o365_outbox")
