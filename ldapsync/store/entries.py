"""SQL for directory entries: reading, candidate selection, storing the changes of a write.

The store knows nothing about LDAP schema or protocol: it stores what the
directory layer computed (display DN, normalized DN, path key, attributes,
index rows) and answers index and scope queries.  Every function here runs
inside a transaction (``*_txn``, ``txn`` first).

The directory layer computes each write as :class:`EntryChange` rows and
stores them with :func:`write_changes_txn`; what follows a write (the change
hooks, e.g. the Microsoft 365 outbox) is the directory's business
(``ldapsync/directory/hooks.py``).  The store keeps no registry and never calls
out.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ldapsync.store.database import Txn
from ldapsync.store.tables import INDEX_VALUE_MAX

Attrs = dict[str, list[str]]


def first(attrs: Attrs | None, name: str) -> str | None:
    """The first value of ``name`` in ``attrs`` (None when the entry or the attribute is missing)."""
    vals = (attrs or {}).get(name)
    return vals[0] if vals else None
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
    parent_norm: str | None = None  # set (and parent_id None) when the parent is new in this same write


def _dumps(attrs: Attrs) -> str:
    return json.dumps(attrs, separators=(",", ":"))


_COLS = "id, dn, dn_norm, path, parent_id, attrs"


def _row(r: Any) -> StoredEntry:
    return StoredEntry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]))


def _in(n: int) -> str:
    return "(" + ",".join("?" * n) + ")"


def _lock(txn: Txn, for_update: bool) -> str:
    return " FOR UPDATE" if for_update and txn.is_postgres else ""


# -- reading ---------------------------------------------------------------

def get_entry_txn(txn: Txn, dn_norm: str, *, for_update: bool = False) -> StoredEntry | None:
    rows = txn.rows(f"SELECT {_COLS} FROM entries WHERE dn_norm = ?" + _lock(txn, for_update), (dn_norm,))
    return _row(rows[0]) if rows else None


def get_entries_txn(txn: Txn, dn_norms: Iterable[str], *, for_update: bool = False) -> dict[str, StoredEntry]:
    norms = list(set(dn_norms))
    out: dict[str, StoredEntry] = {}
    for i in range(0, len(norms), 500):
        part = norms[i:i + 500]
        for r in txn.rows(f"SELECT {_COLS} FROM entries WHERE dn_norm IN {_in(len(part))}" + _lock(txn, for_update), part):
            e = _row(r)
            out[e.dn_norm] = e
    return out


def get_entries_by_id_txn(txn: Txn, ids: Sequence[int], *, for_update: bool = False) -> list[StoredEntry]:
    out: list[StoredEntry] = []
    for i in range(0, len(ids), 500):
        part = list(ids[i:i + 500])
        out.extend(_row(r) for r in txn.rows(f"SELECT {_COLS} FROM entries WHERE id IN {_in(len(part))}"
                                             + _lock(txn, for_update), part))
    return out


def existing_ancestor_txn(txn: Txn, dn_norms_leaf_first: Sequence[str]) -> str | None:
    """The first of the given normalized DNs that exists (for matchedDN)."""
    if not dn_norms_leaf_first:
        return None
    norms = list(dn_norms_leaf_first)
    found = {r[0]: r[1] for r in txn.rows(f"SELECT dn_norm, dn FROM entries WHERE dn_norm IN {_in(len(norms))}", norms)}
    for n in norms:
        if n in found:
            return found[n]
    return None


def has_children_txn(txn: Txn, entry_id: int) -> bool:
    return bool(txn.rows("SELECT 1 FROM entries WHERE parent_id = ? LIMIT 1", (entry_id,)))


def children_flags_txn(txn: Txn, ids: Sequence[int]) -> set[int]:
    """Which of ``ids`` have at least one child."""
    if not ids:
        return set()
    ids = list(ids)
    return {r[0] for r in txn.rows(f"SELECT DISTINCT parent_id FROM entries WHERE parent_id IN {_in(len(ids))}", ids)}


def ids_with_value_txn(txn: Txn, attr: str, value: str) -> list[int]:
    return [r[0] for r in txn.rows("SELECT entry_id FROM entry_index WHERE attr = ? AND value = ?", (attr, value[:INDEX_VALUE_MAX]))]


def entries_with_value_txn(txn: Txn, attr: str, value: str, *, for_update: bool = False) -> list[StoredEntry]:
    rows = txn.rows(
        f"SELECT {_COLS} FROM entries WHERE id IN (SELECT entry_id FROM entry_index WHERE attr = ? AND value = ?)"
        + _lock(txn, for_update),
        (attr, value[:INDEX_VALUE_MAX]),
    )
    return [_row(r) for r in rows]


def entries_with_values_txn(txn: Txn, attr: str, values: Sequence[str]) -> list[tuple[str, StoredEntry]]:
    """(index value, entry) for every entry whose index lists one of ``values`` under ``attr``; one
    query per 500 values (a bulk load checks a thousand at once).  Index values are cut at
    INDEX_VALUE_MAX: callers check each entry's full value."""
    out: list[tuple[str, StoredEntry]] = []
    cut = sorted({v[:INDEX_VALUE_MAX] for v in values})
    for i in range(0, len(cut), 500):
        chunk = cut[i:i + 500]
        rows = txn.rows(
            f"SELECT ei.value, {', '.join('e.' + c.strip() for c in _COLS.split(','))} FROM entry_index ei "
            f"JOIN entries e ON e.id = ei.entry_id WHERE ei.attr = ? AND ei.value IN {_in(len(chunk))}",
            (attr, *chunk),
        )
        out.extend((r[0], _row(r[1:])) for r in rows)
    return out


def entries_containing_txn(txn: Txn, text: str) -> list[StoredEntry]:
    """Entries whose stored attributes mention ``text`` (lower case) anywhere: a full scan, for a
    check on an attribute the configuration does not index (callers verify each candidate)."""
    pattern = "%" + text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    rows = txn.rows(f"SELECT {_COLS} FROM entries WHERE lower(attrs) LIKE ? ESCAPE '\\'", (pattern,))
    return [_row(r) for r in rows]


def lock_values_txn(txn: Txn, attr: str, values: Iterable[str]) -> None:
    """Hold (``attr``, value) for this transaction: a second writer of the same value waits here
    until this one commits or rolls back, then sees its rows (READ COMMITTED reads anew per
    statement).  PostgreSQL transaction-scoped advisory locks, taken in sorted order; SQLite write
    transactions are one at a time already (BEGIN IMMEDIATE), so nothing is needed there."""
    if not txn.is_postgres:
        return
    keys = sorted({_lock_key(attr, v) for v in values})
    for i in range(0, len(keys), 500):        # in key order, so two writers never wait on each other in a cycle
        txn.run("SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(? AS bigint[])) WITH ORDINALITY AS t(k, n) ORDER BY n",
                (keys[i:i + 500],))


def _lock_key(attr: str, value: str) -> int:
    digest = hashlib.blake2b(f"ldapsync-unique\0{attr}\0{value}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def groups_listing_txn(txn: Txn, attrs: Sequence[str], values: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """For each value (a member's normalized DN): the (dn_norm, dn) of entries whose index lists it
    under one of ``attrs``.  One query per 500 values instead of one per value and attribute (adds
    in bulk: ldif load, import).  Values must be shorter than INDEX_VALUE_MAX."""
    out: dict[str, list[tuple[str, str]]] = {}
    for i in range(0, len(values), 500):
        chunk = list(values[i:i + 500])
        rows = txn.rows(
            "SELECT ei.value, e.dn_norm, e.dn FROM entry_index ei JOIN entries e ON e.id = ei.entry_id "
            f"WHERE ei.attr IN {_in(len(attrs))} AND ei.value IN {_in(len(chunk))}",
            (*attrs, *chunk),
        )
        for value, dn_norm, dn in rows:
            out.setdefault(value, []).append((dn_norm, dn))
    return out


def descendants_txn(txn: Txn, path: str) -> list[StoredEntry]:
    lo, hi = path_range(path)
    return [_row(r) for r in txn.rows(f"SELECT {_COLS} FROM entries WHERE path > ? AND path < ? ORDER BY path", (lo, hi))]


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
#   ("eq", attr, value) | ("in", attr, values) | ("present", attr) | ("prefix", attr, prefix) |
#   ("like", attr, pattern) | ("and", [plans]) | ("or", [plans]) | ("none",) (selects nothing)
Plan = tuple[Any, ...]


def _like_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# SQLite re-prepares a statement whose ``attr = ?`` might select the partial index on entryUUID
# (``ix_entry_index_uuid ... WHERE attr = 'entryuuid'``) every time it is run with a new binding:
# planning the search query again cost ~60 of its ~85 µs.  Attribute names (lower-case schema
# names) go into SQLite's statement text as literals instead; one statement per attribute, kept
# in sqlite3's statement cache.  PostgreSQL keeps parameters (its SQL text cache is not bounded).
_LITERAL_ATTR = re.compile(r"[a-z][a-z0-9-]{0,63}\Z")


def _attr_eq(attr: str, params: list[Any], literal: bool) -> str:
    if literal and _LITERAL_ATTR.match(attr):
        return f"attr = '{attr}'"
    params.append(attr)
    return "attr = ?"


def _plan_sql(plan: Plan, params: list[Any], literal: bool = False) -> str:
    kind = plan[0]
    if kind == "none":
        return "1 = 0"
    if kind in ("and", "or"):
        joiner = " AND " if kind == "and" else " OR "
        return "(" + joiner.join(_plan_sql(p, params, literal) for p in plan[1]) + ")"
    sub = "id IN (SELECT entry_id FROM entry_index WHERE " + _attr_eq(plan[1], params, literal)
    if kind == "eq":
        params.append(plan[2][:INDEX_VALUE_MAX])
        return sub + " AND value = ?)"
    if kind == "in":
        values = list(dict.fromkeys(v[:INDEX_VALUE_MAX] for v in plan[2]))
        params += values
        return sub + f" AND value IN {_in(len(values))})"
    if kind == "present":
        return sub + ")"
    if kind == "prefix":
        p = plan[2][:INDEX_VALUE_MAX]
        if not p:
            return sub + ")"
        params += [p, _upper(p)]
        return sub + " AND value >= ? AND value < ?)"
    if kind == "like":
        params.append(plan[2])
        return sub + " AND value LIKE ? ESCAPE '\\')"
    raise ValueError(f"unknown plan node {kind!r}")


def like_pattern(initial: str | None, any_: Sequence[str], final: str | None) -> str:
    return _like_escape(initial or "") + "%" + "".join(_like_escape(a) + "%" for a in any_) + _like_escape(final or "")


def search_candidates_txn(
    txn: Txn,
    *,
    scope: str,
    base_norm: str,
    base_path: str,
    plan: Plan | None,
    after_id: int,
    limit: int,
) -> list[StoredEntry]:
    """Entries in scope that the plan selects, ``id > after_id``, in id order.

    The scope is a SQL condition on the base's normalized DN or path key, so
    the base entry itself need not be read first.
    """
    params: list[Any] = [after_id]
    cond = ["id > ?"]
    if scope == "base":
        cond.append("dn_norm = ?")
        params.append(base_norm)
    elif scope == "one":
        if not base_norm:
            cond.append("parent_id IS NULL")
        else:
            cond.append("parent_id = (SELECT id FROM entries WHERE dn_norm = ?)")
            params.append(base_norm)
    elif scope in ("sub", "children"):
        if base_path:
            lo, hi = path_range(base_path)
            cond.append("path > ?" if scope == "children" else "path >= ?")
            cond.append("path < ?")
            params += [lo, hi]
    else:
        raise ValueError(scope)
    if plan is not None:
        cond.append(_plan_sql(plan, params, not txn.is_postgres))
    params.append(limit)
    rows = txn.rows(f"SELECT {_COLS} FROM entries WHERE " + " AND ".join(cond) + " ORDER BY id LIMIT ?", params)
    return [_row(r) for r in rows]


def entry_exists_txn(txn: Txn, dn_norm: str) -> bool:
    return bool(txn.rows("SELECT 1 FROM entries WHERE dn_norm = ?", (dn_norm,)))


# -- writing ----------------------------------------------------------------

def _insert_entry(txn: Txn, dn: str, dn_norm: str, path: str, parent_id: int | None, attrs: Attrs) -> int:
    sql = "INSERT INTO entries (dn, dn_norm, path, parent_id, attrs) VALUES (?, ?, ?, ?, ?)"
    params = (dn, dn_norm, path, parent_id, _dumps(attrs))
    if txn.is_postgres:
        return int(txn.run(sql + " RETURNING id", params).fetchone()[0])
    return int(txn.run(sql, params).lastrowid)


def _insert_entries(txn: Txn, adds: Sequence[EntryChange]) -> None:
    """Several new entries in a few multi-row INSERTs (bulk adds: a round trip each on PostgreSQL
    was most of an import's time).  Ids come back with their dn_norm (unique), so the order in
    which the database returns them does not matter."""
    for i in range(0, len(adds), 200):
        chunk = adds[i:i + 200]
        params: list[Any] = []
        for ch in chunk:
            assert ch.new is not None
            params += [ch.dn, ch.dn_norm, ch.path, ch.parent_id, _dumps(ch.new)]
        values = ", ".join(["(?, ?, ?, ?, ?)"] * len(chunk))
        rows = txn.rows(f"INSERT INTO entries (dn, dn_norm, path, parent_id, attrs) VALUES {values} RETURNING id, dn_norm",
                        params)
        ids = {dn_norm: int(i) for i, dn_norm in rows}
        for ch in chunk:
            ch.entry_id = ids[ch.dn_norm]


def write_changes_txn(txn: Txn, changes: Sequence[EntryChange]) -> None:
    """Store entries and index rows: deletes first (children before parents), then adds, then the rest.

    Adds go in one batch.  A new entry whose parent is new in the same write (bootstrap, ``ldif
    load`` of a tree) carries the parent's ``parent_norm`` instead of an id; it is resolved once
    the batch is stored.  Index rows of all entries go in one batch each (delete, insert)."""
    for ch in changes:
        if ch.kind == "delete":
            txn.run("DELETE FROM entry_index WHERE entry_id = ?", (ch.entry_id,))
            txn.run("DELETE FROM entries WHERE id = ?", (ch.entry_id,))
    adds = [ch for ch in changes if ch.kind == "add"]
    if len(adds) > 1:
        _insert_entries(txn, adds)
    elif adds:
        ch = adds[0]
        assert ch.new is not None
        ch.entry_id = _insert_entry(txn, ch.dn, ch.dn_norm, ch.path, ch.parent_id, ch.new)
    _resolve_parents(txn, changes, adds)
    index_del: list[tuple[int, str, str]] = []
    index_add: list[tuple[int, str, str]] = []
    for ch in changes:
        if ch.kind == "delete":
            continue
        assert ch.new is not None
        if ch.kind != "add":
            txn.run(
                "UPDATE entries SET dn = ?, dn_norm = ?, path = ?, parent_id = ?, attrs = ? WHERE id = ?",
                (ch.dn, ch.dn_norm, ch.path, ch.parent_id, _dumps(ch.new), ch.entry_id),
            )
        assert ch.entry_id is not None
        index_del += [(ch.entry_id, a, v[:INDEX_VALUE_MAX]) for a, v in ch.index_del]
        index_add += [(ch.entry_id, a, v[:INDEX_VALUE_MAX]) for a, v in ch.index_add]
    if index_del:
        txn.run_many("DELETE FROM entry_index WHERE entry_id = ? AND attr = ? AND value = ?", index_del)
    if index_add:
        txn.run_many("INSERT INTO entry_index (entry_id, attr, value) VALUES (?, ?, ?)", index_add)


def _resolve_parents(txn: Txn, changes: Sequence[EntryChange], adds: Sequence[EntryChange]) -> None:
    """Give each change whose parent is new in this write (``parent_norm``) its parent's id; adds
    were inserted without it, so they get it by UPDATE (renames are stored after this)."""
    waiting = [ch for ch in changes if ch.kind != "delete" and ch.parent_norm is not None and ch.parent_id is None]
    if not waiting:
        return
    ids = {ch.dn_norm: ch.entry_id for ch in adds}
    fixes: list[tuple[int, int]] = []
    for ch in waiting:
        assert ch.parent_norm is not None
        pid = ids.get(ch.parent_norm)
        if pid is None:
            parent = get_entry_txn(txn, ch.parent_norm)
            if parent is None:
                raise ValueError(f"the parent of {ch.dn!r} is not stored")
            pid = parent.id
        ch.parent_id, ch.parent_norm = pid, None
        if ch.kind == "add":
            assert ch.entry_id is not None
            fixes.append((pid, ch.entry_id))
    if fixes:
        txn.run_many("UPDATE entries SET parent_id = ? WHERE id = ?", fixes)


def all_entries_txn(txn: Txn, after_path: str, limit: int) -> list[StoredEntry]:
    """Entries in path order (parents before children), for ``ldif dump``."""
    return [_row(r) for r in txn.rows(f"SELECT {_COLS} FROM entries WHERE path > ? ORDER BY path LIMIT ?", (after_path, limit))]


def get_meta_txn(txn: Txn, key: str) -> str | None:
    rows = txn.rows("SELECT value FROM meta WHERE key = ?", (key,))
    return rows[0][0] if rows else None


def set_meta_txn(txn: Txn, key: str, value: str) -> None:
    if txn.rows("SELECT 1 FROM meta WHERE key = ?", (key,)):
        txn.run("UPDATE meta SET value = ? WHERE key = ?", (value, key))
    else:
        txn.run("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
