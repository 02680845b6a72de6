"""SQL for directory entries: reading, candidate selection, applying a ChangeSet.

The store knows nothing about LDAP schema or protocol: it stores what the
directory layer computed (display DN, normalized DN, path key, attributes,
index rows) and answers index and scope queries.  Every function here runs
inside a transaction (``*_txn``, ``txn`` first).

A :class:`ChangeSet` is the one description of a write: the directory layer
builds it, :func:`apply_changeset_txn` stores it (entries, index, and then every
registered change hook — e.g. the Microsoft 365 outbox — in the same
transaction).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from ldapsync.store.database import Txn
from ldapsync.store.tables import INDEX_VALUE_MAX, entries, entry_index, meta

Attrs = dict[str, list[str]]
IndexRow = tuple[str, str]


@dataclass
class StoredEntry:
    id: int
    dn: str
    dn_norm: str
    path: str
    parent_id: int | None
    attrs: Attrs
    has_children: bool | None = None


@dataclass
class EntryChange:
    """One entry's part of a write.  ``old``/``new`` are None for add/delete."""

    kind: str                       # "add" | "modify" | "delete" | "rename"
    dn: str                         # display DN after the change (before, for delete)
    dn_norm: str
    path: str
    parent_id: int | None
    new: Attrs | None
    old: Attrs | None = None
    entry_id: int | None = None     # None for add until applied
    old_dn: str | None = None       # for rename
    old_dn_norm: str | None = None
    index_add: set[IndexRow] = field(default_factory=set)
    index_del: set[IndexRow] = field(default_factory=set)


@dataclass
class ChangeSet:
    """Everything one LDAP operation changes, applied in one transaction."""

    operation: str                  # "add", "modify", "delete", "modrdn", "passwd", "load", ...
    actor_dn: str
    changes: list[EntryChange] = field(default_factory=list)
    # Facts a hook may need that the entries alone don't carry, e.g. the
    # cleartext password the client sent (never stored, never logged).
    context: dict[str, Any] = field(default_factory=dict)


ChangeHook = Callable[[Txn, ChangeSet], None]
_hooks: list[ChangeHook] = []


def register_change_hook(hook: ChangeHook) -> None:
    """Run ``hook(txn, changeset)`` inside every write transaction, after the entries are stored."""
    if hook not in _hooks:
        _hooks.append(hook)


def unregister_change_hook(hook: ChangeHook) -> None:
    if hook in _hooks:
        _hooks.remove(hook)


def _dumps(attrs: Attrs) -> str:
    return json.dumps(attrs, separators=(",", ":"))


_COLS = (entries.c.id, entries.c.dn, entries.c.dn_norm, entries.c.path, entries.c.parent_id, entries.c.attrs)


def _row(r: Any) -> StoredEntry:
    return StoredEntry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]))


# -- reading ---------------------------------------------------------------

def get_entry_txn(txn: Txn, dn_norm: str, *, for_update: bool = False) -> StoredEntry | None:
    q = sa.select(*_COLS).where(entries.c.dn_norm == dn_norm)
    if for_update and txn.is_postgres:
        q = q.with_for_update()
    r = txn.conn.execute(q).first()
    return _row(r) if r else None


def get_entries_txn(txn: Txn, dn_norms: Iterable[str], *, for_update: bool = False) -> dict[str, StoredEntry]:
    norms = list(set(dn_norms))
    out: dict[str, StoredEntry] = {}
    for i in range(0, len(norms), 500):
        q = sa.select(*_COLS).where(entries.c.dn_norm.in_(norms[i:i + 500]))
        if for_update and txn.is_postgres:
            q = q.with_for_update()
        for r in txn.conn.execute(q):
            e = _row(r)
            out[e.dn_norm] = e
    return out


def get_entries_by_id_txn(txn: Txn, ids: Sequence[int]) -> list[StoredEntry]:
    out: list[StoredEntry] = []
    for i in range(0, len(ids), 500):
        q = sa.select(*_COLS).where(entries.c.id.in_(list(ids[i:i + 500])))
        out.extend(_row(r) for r in txn.conn.execute(q))
    return out


def existing_ancestor_txn(txn: Txn, dn_norms_leaf_first: Sequence[str]) -> str | None:
    """The first of the given normalized DNs that exists (for matchedDN)."""
    if not dn_norms_leaf_first:
        return None
    q = sa.select(entries.c.dn_norm, entries.c.dn).where(entries.c.dn_norm.in_(list(dn_norms_leaf_first)))
    found = {r[0]: r[1] for r in txn.conn.execute(q)}
    for n in dn_norms_leaf_first:
        if n in found:
            return found[n]
    return None


def has_children_txn(txn: Txn, entry_id: int) -> bool:
    q = sa.select(entries.c.id).where(entries.c.parent_id == entry_id).limit(1)
    return txn.conn.execute(q).first() is not None


def children_flags_txn(txn: Txn, ids: Sequence[int]) -> set[int]:
    """Which of ``ids`` have at least one child."""
    if not ids:
        return set()
    q = sa.select(entries.c.parent_id).where(entries.c.parent_id.in_(list(ids))).distinct()
    return {r[0] for r in txn.conn.execute(q)}


def ids_with_value_txn(txn: Txn, attr: str, value: str) -> list[int]:
    q = sa.select(entry_index.c.entry_id).where(
        entry_index.c.attr == attr, entry_index.c.value == value[:INDEX_VALUE_MAX]
    )
    return [r[0] for r in txn.conn.execute(q)]


def entries_with_value_txn(txn: Txn, attr: str, value: str, *, for_update: bool = False) -> list[StoredEntry]:
    sub = sa.select(entry_index.c.entry_id).where(
        entry_index.c.attr == attr, entry_index.c.value == value[:INDEX_VALUE_MAX]
    )
    q = sa.select(*_COLS).where(entries.c.id.in_(sub))
    if for_update and txn.is_postgres:
        q = q.with_for_update()
    return [_row(r) for r in txn.conn.execute(q)]


def descendants_txn(txn: Txn, path: str) -> list[StoredEntry]:
    lo, hi = path_range(path)
    q = sa.select(*_COLS).where(entries.c.path > lo, entries.c.path < hi).order_by(entries.c.path)
    return [_row(r) for r in txn.conn.execute(q)]


def count_entries_txn(txn: Txn) -> int:
    return int(txn.conn.execute(sa.select(sa.func.count()).select_from(entries)).scalar_one())


# -- candidate selection for searches -------------------------------------------

def _upper(prefix: str) -> str:
    """The smallest string greater than every string starting with ``prefix``."""
    last = ord(prefix[-1]) + 1
    if 0xD800 <= last <= 0xDFFF:
        last = 0xE000
    return prefix[:-1] + chr(min(last, 0x10FFFF))


def path_range(path_key: str) -> tuple[str, str]:
    """(lo, hi): entries strictly below ``path_key`` have lo < path < hi; path == lo is the entry itself."""
    if not path_key:
        return "", "\U0010ffff"
    return path_key, _upper(path_key)


# A SQL plan for a filter is a tree of tuples:
#   ("eq", attr, value) | ("present", attr) | ("prefix", attr, prefix) |
#   ("like", attr, pattern) | ("and", [plans]) | ("or", [plans])
Plan = tuple[Any, ...]


def _like_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _plan_clause(plan: Plan) -> Any:
    kind = plan[0]
    ix = entry_index.c
    if kind == "eq":
        return entries.c.id.in_(sa.select(ix.entry_id).where(ix.attr == plan[1], ix.value == plan[2][:INDEX_VALUE_MAX]))
    if kind == "present":
        return entries.c.id.in_(sa.select(ix.entry_id).where(ix.attr == plan[1]))
    if kind == "prefix":
        p = plan[2][:INDEX_VALUE_MAX]
        cond = [ix.attr == plan[1]]
        if p:
            cond += [ix.value >= p, ix.value < _upper(p)]
        return entries.c.id.in_(sa.select(ix.entry_id).where(*cond))
    if kind == "like":
        return entries.c.id.in_(sa.select(ix.entry_id).where(ix.attr == plan[1], ix.value.like(plan[2], escape="\\")))
    if kind == "and":
        return sa.and_(*[_plan_clause(p) for p in plan[1]])
    if kind == "or":
        return sa.or_(*[_plan_clause(p) for p in plan[1]])
    raise ValueError(f"unknown plan node {kind!r}")


def like_pattern(initial: str | None, any_: Sequence[str], final: str | None) -> str:
    return _like_escape(initial or "") + "%" + "".join(_like_escape(a) + "%" for a in any_) + _like_escape(final or "")


def search_candidates_txn(
    txn: Txn,
    *,
    scope: str,
    base: StoredEntry | None,
    plan: Plan | None,
    after_id: int,
    limit: int,
) -> list[StoredEntry]:
    """Entries in scope that the plan selects, ``id > after_id``, in id order."""
    cond: list[Any] = [entries.c.id > after_id]
    if scope == "base":
        assert base is not None
        cond.append(entries.c.id == base.id)
    elif scope == "one":
        if base is None:
            cond.append(entries.c.parent_id.is_(None))
        else:
            cond.append(entries.c.parent_id == base.id)
    elif scope in ("sub", "children"):
        if base is not None:
            lo, hi = path_range(base.path)
            cond.append(entries.c.path > lo if scope == "children" else entries.c.path >= lo)
            cond.append(entries.c.path < hi)
    else:
        raise ValueError(scope)
    if plan is not None:
        cond.append(_plan_clause(plan))
    q = sa.select(*_COLS).where(*cond).order_by(entries.c.id).limit(limit)
    return [_row(r) for r in txn.conn.execute(q)]


# -- writing ----------------------------------------------------------------

def apply_changeset_txn(txn: Txn, cs: ChangeSet) -> None:
    """Store every change of ``cs`` and run the change hooks, all in ``txn``."""
    write_changes_txn(txn, cs.changes)
    run_hooks_txn(txn, cs)


def run_hooks_txn(txn: Txn, cs: ChangeSet) -> None:
    """Let every registered hook add its rows (e.g. the outbox) to this transaction."""
    for hook in list(_hooks):
        hook(txn, cs)


def write_changes_txn(txn: Txn, changes: Sequence[EntryChange]) -> None:
    """Store entries and index rows; deletes first (children before parents), then the rest in order."""
    conn = txn.conn
    for ch in changes:
        if ch.kind == "delete":
            conn.execute(entry_index.delete().where(entry_index.c.entry_id == ch.entry_id))
            conn.execute(entries.delete().where(entries.c.id == ch.entry_id))
    for ch in changes:
        if ch.kind == "delete":
            continue
        assert ch.new is not None
        if ch.kind == "add":
            res = conn.execute(
                entries.insert().values(
                    dn=ch.dn, dn_norm=ch.dn_norm, path=ch.path, parent_id=ch.parent_id, attrs=_dumps(ch.new)
                )
            )
            ch.entry_id = int(res.inserted_primary_key[0])
        else:
            conn.execute(
                entries.update()
                .where(entries.c.id == ch.entry_id)
                .values(dn=ch.dn, dn_norm=ch.dn_norm, path=ch.path, parent_id=ch.parent_id, attrs=_dumps(ch.new))
            )
        if ch.index_del:
            for attr, value in ch.index_del:
                conn.execute(
                    entry_index.delete().where(
                        entry_index.c.entry_id == ch.entry_id,
                        entry_index.c.attr == attr,
                        entry_index.c.value == value[:INDEX_VALUE_MAX],
                    )
                )
        if ch.index_add:
            conn.execute(
                entry_index.insert(),
                [{"entry_id": ch.entry_id, "attr": a, "value": v[:INDEX_VALUE_MAX]} for a, v in ch.index_add],
            )


def bulk_insert_txn(txn: Txn, rows: list[tuple[str, str, str, int | None, Attrs, set[IndexRow]]]) -> list[int]:
    """Fast path for ``ldif load``: insert many new entries (parents first)."""
    ids: list[int] = []
    index_rows: list[dict[str, Any]] = []
    for dn, dn_norm, path, parent_id, attrs, index in rows:
        res = txn.conn.execute(
            entries.insert().values(dn=dn, dn_norm=dn_norm, path=path, parent_id=parent_id, attrs=_dumps(attrs))
        )
        eid = int(res.inserted_primary_key[0])
        ids.append(eid)
        index_rows.extend({"entry_id": eid, "attr": a, "value": v[:INDEX_VALUE_MAX]} for a, v in index)
    if index_rows:
        txn.conn.execute(entry_index.insert(), index_rows)
    return ids


def all_entries_txn(txn: Txn, after_path: str, limit: int) -> list[StoredEntry]:
    """Entries in path order (parents before children), for ``ldif dump``."""
    q = sa.select(*_COLS).where(entries.c.path > after_path).order_by(entries.c.path).limit(limit)
    return [_row(r) for r in txn.conn.execute(q)]


def get_meta_txn(txn: Txn, key: str) -> str | None:
    r = txn.conn.execute(sa.select(meta.c.value).where(meta.c.key == key)).first()
    return r[0] if r else None


def set_meta_txn(txn: Txn, key: str, value: str) -> None:
    if txn.conn.execute(sa.select(meta.c.key).where(meta.c.key == key)).first():
        txn.conn.execute(meta.update().where(meta.c.key == key).values(value=value))
    else:
        txn.conn.execute(meta.insert().values(key=key, value=value))
