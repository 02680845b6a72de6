"""entryUUID is unique: a partial unique index on its index rows.

The Microsoft 365 outbox, the self-service links and the sync status key on
entryUUID, so two entries sharing one could act on each other's Microsoft 365
account (an ``ldif load`` accepted a copy of another entry's entryUUID).  The
directory always indexes entryUUID now; this migration

1. adds the entryuuid index rows an ``[directory] indexed`` list without entryUUID left out,
2. gives every later holder of a duplicated entryUUID (higher id: loaded after the
   original) a fresh one, logging both DNs — the server must be able to start, and
   the first holder keeps its Microsoft 365 link,
3. creates the unique index ``ix_entry_index_uuid`` on ``entry_index(value) WHERE attr = 'entryuuid'``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""
import json
import logging
import uuid

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")
WHERE = sa.text("attr = 'entryuuid'")


def _norm(value: str) -> str:
    return value.strip().lower()        # UUIDMatch, as ldapsync.directory.schema normalizes it


def upgrade() -> None:
    bind = op.get_bind()
    indexed = {r[0] for r in bind.execute(sa.text("SELECT DISTINCT entry_id FROM entry_index WHERE attr = 'entryuuid'"))}
    total = bind.execute(sa.text("SELECT COUNT(*) FROM entries")).scalar_one()
    if len(indexed) < total:
        rows = []
        for eid, attrs in bind.execute(sa.text("SELECT id, attrs FROM entries")):
            if eid in indexed:
                continue
            for v in json.loads(attrs).get("entryUUID", ()):
                rows.append({"e": eid, "v": _norm(v)})
        if rows:
            bind.execute(sa.text("INSERT INTO entry_index (entry_id, attr, value) VALUES (:e, 'entryuuid', :v)"), rows)
    dups = bind.execute(sa.text(
        "SELECT value FROM entry_index WHERE attr = 'entryuuid' GROUP BY value HAVING COUNT(*) > 1")).scalars().all()
    for value in dups:
        holders = bind.execute(sa.text(
            "SELECT e.id, e.dn, e.attrs FROM entry_index ei JOIN entries e ON e.id = ei.entry_id "
            "WHERE ei.attr = 'entryuuid' AND ei.value = :v ORDER BY e.id"), {"v": value}).all()
        keeper = holders[0]
        for eid, dn, attrs_json in holders[1:]:
            fresh = str(uuid.uuid4())
            attrs = json.loads(attrs_json)
            attrs["entryUUID"] = [fresh]
            bind.execute(sa.text("UPDATE entries SET attrs = :a WHERE id = :i"),
                         {"a": json.dumps(attrs, separators=(",", ":")), "i": eid})
            bind.execute(sa.text("UPDATE entry_index SET value = :n WHERE entry_id = :i AND attr = 'entryuuid'"),
                         {"n": fresh, "i": eid})
            log.warning("entryUUID %s was held by %r and %r: %r now has entryUUID %s", value, keeper[1], dn, dn, fresh)
    op.create_index("ix_entry_index_uuid", "entry_index", ["value"], unique=True,
                    sqlite_where=WHERE, postgresql_where=WHERE)


def downgrade() -> None:
    op.drop_index("ix_entry_index_uuid", table_name="entry_index")
