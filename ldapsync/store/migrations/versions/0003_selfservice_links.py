"""Self-service one-time links (activation and password reset).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "selfservice_links",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("entry_uuid", sa.String(64), nullable=False),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=True),
        sa.Column("sent_at", sa.Float, nullable=True),
        sa.Column("used_at", sa.Float, nullable=True),
        sa.Column("sent_to", sa.Text, nullable=True),
        sa.Column("requested_by", sa.Text, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.Float, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=True),
    )
    op.create_index("ix_selfservice_links_token", "selfservice_links", ["token_hash"], unique=True)
    op.create_index("ix_selfservice_links_user", "selfservice_links", ["entry_uuid", "purpose"])
    op.create_index("ix_selfservice_links_due", "selfservice_links", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_table("selfservice_links")
