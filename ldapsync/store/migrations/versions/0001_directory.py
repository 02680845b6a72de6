"""The directory: entries, their index, settings.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

CText = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "entries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("dn", sa.Text, nullable=False),
        sa.Column("dn_norm", CText, nullable=False),
        sa.Column("path", CText, nullable=False),
        sa.Column("parent_id", sa.Integer, sa.ForeignKey("entries.id"), nullable=True),
        sa.Column("attrs", sa.Text, nullable=False),
    )
    op.create_index("ix_entries_dn_norm", "entries", ["dn_norm"], unique=True)
    op.create_index("ix_entries_path", "entries", ["path"])
    op.create_index("ix_entries_parent", "entries", ["parent_id"])
    op.create_table(
        "entry_index",
        sa.Column("entry_id", sa.Integer, sa.ForeignKey("entries.id", ondelete="CASCADE"), nullable=False),
        sa.Column("attr", CText, nullable=False),
        sa.Column("value", CText, nullable=False),
    )
    op.create_index("ix_entry_index_attr_value", "entry_index", ["attr", "value", "entry_id"])
    op.create_index("ix_entry_index_entry", "entry_index", ["entry_id"])
    op.create_table(
        "meta",
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("meta")
    op.drop_table("entry_index")
    op.drop_table("entries")
