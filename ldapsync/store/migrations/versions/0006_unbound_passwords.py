"""Passwords of unbound users, kept sealed for ``[office365] unbound_password_ttl``.

A password set on an ``ldapsyncUser`` entry that is not bound at that moment is kept
(AES-GCM, like queued passwords) so that binding the user soon after pushes it to
Microsoft 365 (see ldapsync/store/unbound_passwords.py).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "o365_unbound_passwords",
        sa.Column("entry_uuid", sa.String(64), primary_key=True),
        sa.Column("secret", sa.Text, nullable=False),
        sa.Column("set_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_index("ix_o365_unbound_passwords_expires", "o365_unbound_passwords", ["expires_at"])


def downgrade() -> None:
    op.drop_table("o365_unbound_passwords")
