"""o365_account_records: a user's link to its Microsoft 365 account outlives the binding and the entry.

One row per ever-bound user that was unbound or deleted (entryUUID, object id, UPN, DN, state,
when), so the account stays blocked and the reconcilers keep it so
(``ldapsync/store/account_records.py``).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "o365_account_records",
        sa.Column("entry_uuid", sa.String(64), primary_key=True),
        sa.Column("object_id", sa.String(64), nullable=True),
        sa.Column("upn", sa.Text, nullable=True),
        sa.Column("dn", sa.Text, nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("recorded_at", sa.Float, nullable=False),
    )
    op.create_index("ix_o365_account_records_object", "o365_account_records", ["object_id"])


def downgrade() -> None:
    op.drop_table("o365_account_records")
