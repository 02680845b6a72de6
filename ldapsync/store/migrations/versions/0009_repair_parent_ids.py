"""Repair ``entries.parent_id`` of entries stored together with their parent.

Before this revision, an entry added in the same write as its parent (the tree that
``ldapsync init`` bootstraps, ``ldif load`` of a whole tree) was stored with
``parent_id`` NULL.  One-level searches did not find it, and its parent counted as a
leaf (a delete of ``ou=people`` was allowed with users under it).  The write path now
resolves the parent's id when it stores both (``store/entries.py: _resolve_parents``);
this revision repairs the rows that were stored before.

An entry's parent is the stored entry whose path key is the longest proper prefix of
the entry's own, cut at a ``,`` (path keys are the normalized RDNs from the suffix down,
each followed by ``,``).  An entry with no such entry above it (the suffix, ``cn=admin``
at the top of its own tree) keeps NULL.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08
"""
import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def parent_path(path: str, known: dict[str, int]) -> str | None:
    """The longest proper prefix of ``path`` (cut after a ``,``) that ``known`` holds."""
    end = len(path) - 1                      # path ends with ","; the entry's own RDN is before it
    while True:
        end = path.rfind(",", 0, end)
        if end < 0:
            return None
        prefix = path[:end + 1]
        if prefix in known:                  # (a "," escaped inside a value matches nothing: go on up)
            return prefix


def upgrade() -> None:
    conn = op.get_bind()
    orphans = conn.execute(sa.text("SELECT id, path FROM entries WHERE parent_id IS NULL")).all()
    if not orphans:
        return
    known = {path: int(i) for i, path in conn.execute(sa.text("SELECT id, path FROM entries"))}
    fixes = []
    for entry_id, path in orphans:
        parent = parent_path(path, known)
        if parent is not None:
            fixes.append({"p": known[parent], "i": int(entry_id)})
    if fixes:
        conn.execute(sa.text("UPDATE entries SET parent_id = :p WHERE id = :i"), fixes)


def downgrade() -> None:
    pass                                     # the repaired ids are right for the older code too
