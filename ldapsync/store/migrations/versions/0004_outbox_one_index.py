"""The outbox keeps one index: (entry_uuid, id).

Every queued change wrote three B-tree pages (the row, the per-user index and
the (state, next_attempt_at) index) into the LDAP write's COMMIT.  Nothing hot
needs the second index: claims look rows up per user (and SQLite picked the
state index for that lookup, scanning every ready row before the user's own),
and the queries by state (queue depth every few seconds, `o365 release`,
`o365 reconcile --retry-errors`) scan a table that is small except during a
mass change.  Dropping it made an LDAP modify of a bound user about 70 µs
cheaper (bench_propagation.py modify-cost, tenant paused).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_o365_outbox_due", table_name="o365_outbox")


def downgrade() -> None:
    op.create_index("ix_o365_outbox_due", "o365_outbox", ["state", "next_attempt_at"])
