"""The outbox's fencing token: ``o365_outbox.lease_gen``.

Every claim of a user's head row adds one to it, and a worker completes or fails the
user's rows only while the head still carries the owner *and* the generation of its
own claim (``ldapsync/store/outbox.py: owns_lease_txn``).  A node that comes back
after the others presumed it dead (its heartbeat stopped: a frozen VM, a long stall)
therefore cannot complete a delivery they have redone, even when the user was
re-claimed under the same node id since.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a plain ADD COLUMN on both databases (a constant default: no table rewrite, no lock held long)
    op.add_column("o365_outbox", sa.Column("lease_gen", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("o365_outbox") as batch:
        batch.drop_column("lease_gen")
