"""Table definitions (SQLAlchemy Core).  Migrations in ``migrations/`` build these.

- ``entries``: one row per directory entry.  ``attrs`` is the whole entry as
  JSON (canonical attribute name → list of string values, operational ones
  included); ``path`` is the entry's normalized DN reversed (see
  ``ldapsync.directory.dn.DN.path_key``) so that a subtree is one index range;
  ``parent_id`` makes one-level scope an index lookup.
- ``entry_index``: (attribute, normalized value) → entry, for the attributes
  configured as indexed.  Values longer than ``INDEX_VALUE_MAX`` are cut; the
  index only selects candidates and every candidate is checked against the full
  filter, so a cut value can never produce a wrong answer.  entryUUID is always
  indexed, and its rows are unique (``ix_entry_index_uuid``).
- ``meta``: small key/value settings (e.g. the schema of the index).
"""

from __future__ import annotations

import sqlalchemy as sa

INDEX_VALUE_MAX = 200

metadata = sa.MetaData()

# Byte-order ("C") collation on PostgreSQL so that range scans on path/value
# behave exactly like SQLite's BINARY collation.
CText = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")

entries = sa.Table(
    "entries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("dn", sa.Text, nullable=False),
    sa.Column("dn_norm", CText, nullable=False),
    sa.Column("path", CText, nullable=False),
    sa.Column("parent_id", sa.Integer, sa.ForeignKey("entries.id"), nullable=True),
    sa.Column("attrs", sa.Text, nullable=False),
    sa.Index("ix_entries_dn_norm", "dn_norm", unique=True),
    sa.Index("ix_entries_path", "path"),
    sa.Index("ix_entries_parent", "parent_id"),
)

entry_index = sa.Table(
    "entry_index",
    metadata,
    sa.Column("entry_id", sa.Integer, sa.ForeignKey("entries.id", ondelete="CASCADE"), nullable=False),
    sa.Column("attr", CText, nullable=False),
    sa.Column("value", CText, nullable=False),
    sa.Index("ix_entry_index_attr_value", "attr", "value", "entry_id"),
    sa.Index("ix_entry_index_entry", "entry_id"),
    # entryUUID is unique (migration 0005): the directory always indexes it.
    sa.Index("ix_entry_index_uuid", "value", unique=True,
             sqlite_where=sa.text("attr = 'entryuuid'"), postgresql_where=sa.text("attr = 'entryuuid'")),
)

meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# The Microsoft 365 outbox (migration 0002): one row per directory change that
# matters to Microsoft 365, written in the change's own transaction.  See
# ldapsync/sync/planner.py for what the columns mean.
o365_outbox = sa.Table(
    "o365_outbox",
    metadata,
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
    # The fencing token (migration 0008): one more at every claim of the head row.
    sa.Column("lease_gen", sa.BigInteger, nullable=False, server_default="0"),
    # The only index (migration 0004 dropped (state, next_attempt_at): each one is another page
    # in every LDAP write that queues a change; the queries by state scan).
    sa.Index("ix_o365_outbox_user", "entry_uuid", "id"),
)

# Self-service one-time links (migration 0003): activation and password-reset
# e-mails.  Only the SHA-256 of a link's token is stored; see ldapsync/store/links.py.
selfservice_links = sa.Table(
    "selfservice_links",
    metadata,
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
    sa.Index("ix_selfservice_links_token", "token_hash", unique=True),
    sa.Index("ix_selfservice_links_user", "entry_uuid", "purpose"),
    sa.Index("ix_selfservice_links_due", "state", "next_attempt_at"),
)

# Passwords set on unbound ldapsyncUser entries, sealed, kept for [office365] unbound_password_ttl
# (migration 0006); see ldapsync/store/unbound_passwords.py.
o365_unbound_passwords = sa.Table(
    "o365_unbound_passwords",
    metadata,
    sa.Column("entry_uuid", sa.String(64), primary_key=True),
    sa.Column("secret", sa.Text, nullable=False),
    sa.Column("set_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Index("ix_o365_unbound_passwords_expires", "expires_at"),
)

# The link to a Microsoft 365 account that outlives the binding and the entry (migration 0007):
# one row per ever-bound user that was unbound or deleted; see ldapsync/store/account_records.py.
o365_account_records = sa.Table(
    "o365_account_records",
    metadata,
    sa.Column("entry_uuid", sa.String(64), primary_key=True),
    sa.Column("object_id", sa.String(64), nullable=True),
    sa.Column("upn", sa.Text, nullable=True),
    sa.Column("dn", sa.Text, nullable=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("recorded_at", sa.Float, nullable=False),
    sa.Index("ix_o365_account_records_object", "object_id"),
)
