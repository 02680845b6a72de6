"""The single place where a write is computed and stored.

Every write — LDAP add/modify/delete/modDN, Password Modify, ``ldif load``,
the CLI — runs inside one transaction as a :class:`Write`:

1. the operation stages its primary changes (``create``, ``update``,
   ``delete``, ``rename``) on entries it loaded through the Write;
2. :meth:`Write.finish` flushes them, then derives what follows from them, in
   order: group ``member`` values follow a renamed or deleted entry (refint),
   and ``memberOf`` on members follows every group change (the memberOf
   overlay, nested when configured);
3. the combined :class:`~ldapsync.directory.hooks.ChangeSet` goes to the
   directory's change hooks (``Directory.hooks``, handed in by the wiring: the
   Microsoft 365 outbox, the activation links) in the same transaction, and the
   status values they ask for are stored with it.

Every Write names its operation (for logs) and its
:class:`~ldapsync.directory.hooks.Origin` (which decides what follows it).

Nothing here talks to the network; all of it runs on a database thread.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ldapsync.directory import unique_mail
from ldapsync.directory.dn import DN
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.hooks import ChangeSet, Origin, StatusValues
from ldapsync.directory.policy import format_time
from ldapsync.store import entries as store
from ldapsync.store.database import Txn
from ldapsync.store.entries import Attrs, EntryChange, StoredEntry
from ldapsync.store.tables import INDEX_VALUE_MAX

if TYPE_CHECKING:
    from ldapsync.directory.core import DirectoryCore

GROUP_ATTRS = ("member", "uniqueMember")


def now_generalized() -> str:
    """Now, as the GeneralizedTime stamps ldapsync writes (``o365SyncedAt``...) carry it."""
    return format_time(time.time())


@dataclass
class Staged:
    """An entry as this write will leave it."""

    old: StoredEntry | None
    dn: DN
    attrs: Attrs | None                 # None: deleted
    parent_id: int | None
    kind: str = "modify"                # add | modify | delete | rename
    touched: bool = False
    parent_norm: str | None = None      # the parent's dn_norm while the parent is new in this write

    @property
    def entry_id(self) -> int | None:
        return self.old.id if self.old else None


@dataclass
class Write:
    directory: "DirectoryCore"          # the directory (its shared helpers are all a Write needs)
    txn: Txn
    actor_dn: str
    operation: str
    origin: Origin
    # The cleartext passwords this write sets, by normalized DN (for the outbox; never stored).
    cleartext: dict[str, list[str]] = field(default_factory=dict)
    _staged: dict[str, Staged] = field(default_factory=dict)     # by current dn_norm
    _order: list[Staged] = field(default_factory=list)
    _all: dict[int, EntryChange] = field(default_factory=dict)    # merged changes by entry id
    _all_order: list[int] = field(default_factory=list)
    _deleted: list[EntryChange] = field(default_factory=list)
    _pending_moves: list[tuple[str, str, str]] = field(default_factory=list)   # (old_norm, new_norm, new_dn)
    _group_changes: list[tuple[Staged, set[str], set[str]]] = field(default_factory=list)
    now: str = field(default_factory=now_generalized)

    # -- loading -----------------------------------------------------------
    def get(self, dn: DN) -> Staged | None:
        st = self._staged.get(dn.norm)
        if st is not None:
            return st if st.attrs is not None else None
        e = store.get_entry_txn(self.txn, dn.norm, for_update=True)
        if e is None:
            return None
        return self.track(e)

    def track(self, e: StoredEntry, *, locked: bool = False) -> Staged:
        """Stage an entry the caller has read itself, e.g. found by an index query; the staged one
        if it is staged already.

        Unless the caller read it ``for_update`` (``locked``), on PostgreSQL the entry is read
        again by its id under a row lock: a write that committed since the caller's read (a
        rename, say) is then seen and never written back over with the stale copy.  (SQLite's
        write transactions hold the database's write lock from BEGIN, so nothing commits between.)
        Raises noSuchObject when the entry was deleted meanwhile."""
        if self.txn.is_postgres and not locked:
            fresh = store.get_entries_by_id_txn(self.txn, [e.id], for_update=True)
            if not fresh:
                raise LDAPError(ResultCode.noSuchObject, f'no entry "{e.dn}" (deleted meanwhile)')
            e = fresh[0]
        st = self._staged.get(e.dn_norm)
        if st is None:
            st = Staged(old=e, dn=self.directory.dn(e.dn), attrs={k: list(v) for k, v in e.attrs.items()}, parent_id=e.parent_id)
            self._staged[e.dn_norm] = st
            self._order.append(st)
        return st

    def require(self, dn: DN) -> Staged:
        st = self.get(dn)
        if st is None:
            raise self.no_such_object(dn)
        return st

    def no_such_object(self, dn: DN) -> LDAPError:
        anc = [p.norm for p in self.directory.ancestors(dn)]
        matched = store.existing_ancestor_txn(self.txn, anc) or ""
        return LDAPError(ResultCode.noSuchObject, f'no entry "{dn}"', matched_dn=matched)

    def exists(self, dn: DN) -> bool:
        st = self._staged.get(dn.norm)
        if st is not None:
            return st.attrs is not None
        return store.get_entry_txn(self.txn, dn.norm) is not None

    # -- staging -------------------------------------------------------------
    def create(self, dn: DN, attrs: Attrs, parent: Staged | None, *, preserve: bool = False) -> Staged:
        """Stage a new entry; ``preserve`` keeps operational values it already has (``ldif load``)."""
        attrs.setdefault("entryUUID", [str(uuid.uuid4())])
        put = attrs.setdefault if preserve else attrs.__setitem__
        put("createTimestamp", [self.now])
        put("modifyTimestamp", [self.now])
        put("creatorsName", [self.actor_dn])
        put("modifiersName", [self.actor_dn])
        st = Staged(old=None, dn=dn, attrs=attrs, parent_id=None, kind="add", touched=True)
        self._set_parent(st, parent)
        self._staged[dn.norm] = st
        self._order.append(st)
        return st

    @staticmethod
    def _set_parent(st: Staged, parent: Staged | None) -> None:
        """A parent staged in this write and not stored yet has no id: the store resolves its
        dn_norm when it stores both (bootstrap, ``ldif load`` of a whole tree)."""
        st.parent_id = parent.entry_id if parent else None
        st.parent_norm = parent.dn.norm if parent is not None and st.parent_id is None else None

    def update(self, st: Staged, attrs: Attrs, *, stamp: bool = True) -> None:
        if stamp:
            attrs["modifyTimestamp"] = [self.now]
            attrs["modifiersName"] = [self.actor_dn]
        st.attrs = attrs
        st.touched = True

    def set_operational(self, st: Staged, values: dict[str, list[str] | None]) -> bool:
        """Set (list) or remove (None) operational values server-side; no modifyTimestamp.

        Returns whether anything changed.  Used for status attributes (o365*, the
        connector's state) that the server maintains and clients cannot write.
        """
        assert st.attrs is not None
        attrs = {k: list(v) for k, v in st.attrs.items()}
        for k, v in values.items():
            if v:
                attrs[k] = list(v)
            else:
                attrs.pop(k, None)
        if attrs == st.attrs:
            return False
        self.update(st, attrs, stamp=False)
        return True

    def delete(self, st: Staged) -> None:
        st.attrs = None
        st.kind = "delete"
        st.touched = True

    def rename(self, st: Staged, new_dn: DN, new_parent: Staged | None, attrs: Attrs) -> None:
        assert st.old is not None
        old_norm = st.dn.norm
        del self._staged[old_norm]
        st.dn = new_dn
        self._set_parent(st, new_parent)
        st.kind = "rename"
        self._staged[new_dn.norm] = st
        self.update(st, attrs)
        self._pending_moves.append((old_norm, new_dn.norm, str(new_dn)))

    def staged(self) -> list[Staged]:
        """The entries this write holds and does not delete, as it will leave them."""
        return [st for st in self._order if st.attrs is not None]

    def staged_by_id(self, entry_id: int) -> Staged | None:
        """The staged entry stored under ``entry_id`` (deleted by this write too), if this write holds it."""
        return next((st for st in self._order if st.entry_id == entry_id), None)

    # -- finishing -------------------------------------------------------------
    def _flush(self, *, write: bool = True) -> list[EntryChange]:
        """Turn the touched staged entries into changes and store them (``write=False``: the
        caller stores the returned changes itself, later in this transaction)."""
        d = self.directory
        changes: list[EntryChange] = []
        for st in self._order:
            if not st.touched:
                continue
            st.touched = False
            old_attrs = st.old.attrs if st.old else None
            prev = self._all.get(st.entry_id) if st.entry_id is not None else None
            if st.attrs is None:
                assert st.old is not None
                ch = EntryChange("delete", st.old.dn, st.old.dn_norm, st.old.path, st.old.parent_id, None,
                                 old=(prev.old if prev else old_attrs), entry_id=st.old.id)
                changes.append(ch)
                self._deleted.append(ch)
                self._all.pop(st.old.id, None)
                continue
            if old_attrs is None:
                new_index, old_index = d.index_rows(st.attrs), set()
            else:
                # Only attributes that changed can change index rows (a status update or a
                # description change touches none): normalize just those.
                keys = [k for k in st.attrs.keys() | old_attrs.keys()
                        if st.attrs.get(k) != old_attrs.get(k) and d.is_indexed(k)]
                new_index = d.index_rows({k: st.attrs.get(k, []) for k in keys}) if keys else set()
                old_index = d.index_rows({k: old_attrs.get(k, []) for k in keys}) if keys else set()
            kind = st.kind
            if st.parent_norm is not None:      # the parent may have been stored by an earlier flush
                parent = self._staged.get(st.parent_norm)
                if parent is not None and parent.entry_id is not None:
                    st.parent_id, st.parent_norm = parent.entry_id, None
            ch = EntryChange(
                kind, str(st.dn), st.dn.norm, st.dn.path_key, st.parent_id, st.attrs,
                old=old_attrs, entry_id=st.entry_id,
                old_dn=st.old.dn if st.old else None, old_dn_norm=st.old.dn_norm if st.old else None,
                index_add=new_index - old_index, index_del=old_index - new_index,
                parent_norm=st.parent_norm,
            )
            # group bookkeeping for memberOf
            if d.is_group(st.attrs) or (old_attrs is not None and d.is_group(old_attrs)):
                self._group_changes.append((st, self._members(old_attrs) if old_attrs else set(), self._members(st.attrs)))
            changes.append(ch)
        if write:
            store.write_changes_txn(self.txn, changes)
        for ch in changes:
            if ch.kind == "delete":
                continue
            assert ch.entry_id is not None
            # Refresh the baseline so a later flush diffs against what is stored now.
            st = self._staged[ch.dn_norm]
            st.parent_id, st.parent_norm = ch.parent_id, None   # resolved by the store
            stored = StoredEntry(ch.entry_id, ch.dn, ch.dn_norm, ch.path, ch.parent_id, {k: list(v) for k, v in (ch.new or {}).items()})
            first = self._all.get(ch.entry_id)
            if first is None:
                self._all[ch.entry_id] = ch
                self._all_order.append(ch.entry_id)
            else:
                first.new = ch.new
                first.dn, first.dn_norm, first.path, first.parent_id = ch.dn, ch.dn_norm, ch.path, ch.parent_id
                if first.kind == "modify" and ch.kind == "rename":
                    first.kind = "rename"
            st.old = stored
            if st.kind == "add":
                st.kind = "modify"
        return changes

    def _members(self, attrs: Attrs | None) -> set[str]:
        if not attrs:
            return set()
        out: set[str] = set()
        for a in GROUP_ATTRS:
            for v in attrs.get(a, ()):
                n = self.directory.dn_norm_or_none(v)
                if n is not None:
                    out.add(n)
        return out

    def _only_plain_modifies(self) -> bool:
        """True when this write only modifies existing entries that are not groups, with no
        rename or delete: then refint and memberOf have nothing to do."""
        d = self.directory
        touched = [st for st in self._order if st.touched]
        return bool(touched) and not self._pending_moves and not self._deleted and not self._group_changes and all(
            st.kind == "modify" and st.attrs is not None and st.old is not None
            and not d.is_group(st.attrs) and not d.is_group(st.old.attrs) for st in touched)

    def finish(self) -> ChangeSet:
        # mail is unique among ldapsyncUser entries (directory/unique_mail.py): checked on the
        # entries as this write leaves them, before anything is stored.
        unique_mail.check_txn(self)
        # A plain modify (the common case) is stored once, after the hooks, together with any
        # status they ask for; anything else is flushed in steps (refint and memberOf need the
        # stored state).
        pending: list[EntryChange] | None = None
        if self._only_plain_modifies():
            pending = self._flush(write=False)
        else:
            # Entries added now that existing groups already list get their memberOf.
            added = [st for st in self._order if st.kind == "add" and st.attrs is not None]
            self._flush()
            # refint: member values follow renamed and deleted entries (and renamed subtrees).
            self._refint()
            self._flush()
            self._member_of([st.dn.norm for st in added])
            self._flush()
        cs = ChangeSet(self.operation, self.actor_dn, self.origin,
                       list(self._deleted) + [self._all[i] for i in self._all_order if i in self._all],
                       cleartext=self.cleartext)
        for hook in self.directory.hooks:
            hook.on_change_txn(self.txn, cs)
        # Hooks may ask for operational status values on the entries they looked at
        # (e.g. o365SyncState: pending); they are stored in this same transaction.
        status = cs.status_updates
        later: dict[str, StatusValues] = {}
        if pending is not None:
            unwritten = {ch.dn_norm: ch for ch in pending}
            for norm, values in status.items():
                ch = unwritten.get(norm)
                if ch is None or ch.new is None or any(self.directory.is_indexed(k) for k in values):
                    later[norm] = values
                    continue
                for k, v in values.items():         # into the change about to be stored: one UPDATE
                    if v:
                        ch.new[k] = list(v)
                    else:
                        ch.new.pop(k, None)
                st = self._staged[norm]
                assert st.old is not None
                st.old = StoredEntry(st.old.id, st.old.dn, st.old.dn_norm, st.old.path, st.old.parent_id,
                                     {k: list(v) for k, v in ch.new.items()})
            store.write_changes_txn(self.txn, pending)
        else:
            later = status
        for norm, values in later.items():
            st = self._staged.get(norm)
            if st is None or st.attrs is None:
                continue
            self.set_operational(st, values)
        if later:
            self._flush()
        return cs

    def _refint(self) -> None:
        moves: dict[str, str | None] = {}
        for old_norm, new_norm, new_dn in self._pending_moves:
            moves[old_norm] = new_dn
        for ch in self._deleted:
            moves[ch.dn_norm] = None
        self._pending_moves.clear()
        if not moves:
            return
        d = self.directory
        for old_norm, new_dn in moves.items():
            for attr in GROUP_ATTRS:
                for e in store.entries_with_value_txn(self.txn, attr.lower(), old_norm, for_update=True):
                    st = self._staged.get(e.dn_norm) or self.track(e)
                    if st.attrs is None:
                        continue
                    vals = st.attrs.get(attr, [])
                    new_vals: list[str] = []
                    for v in vals:
                        if d.dn_norm_or_none(v) == old_norm:
                            if new_dn is not None:
                                new_vals.append(new_dn)
                        else:
                            new_vals.append(v)
                    if new_vals != vals:
                        attrs = dict(st.attrs)
                        if new_vals:
                            attrs[attr] = new_vals
                        else:
                            attrs.pop(attr, None)
                        self.update(st, attrs)

    def _member_of(self, added_norms: list[str]) -> None:
        d = self.directory
        changes = self._group_changes
        self._group_changes = []
        # (member norm) → groups removed (norms), groups added (display DNs)
        removed: dict[str, set[str]] = {}
        addto: dict[str, dict[str, str]] = {}
        affected: set[str] = set()
        for st, old_members, new_members in changes:
            old_group_norm = st.old.dn_norm if st.old else None  # after flush: current
            cur_norm = st.dn.norm
            deleted = st.attrs is None
            # Was the group itself renamed in this write?  _all holds the first old DN.
            first = self._all.get(st.entry_id) if st.entry_id is not None else None
            prev_norm = (first.old_dn_norm if first and first.old_dn_norm else old_group_norm) or cur_norm
            gone = old_members if deleted else (old_members - new_members) | (old_members if prev_norm != cur_norm else set())
            came = set() if deleted else new_members
            for m in gone:
                removed.setdefault(m, set()).add(prev_norm)
                affected.add(m)
            for m in came:
                addto.setdefault(m, {})[cur_norm] = str(st.dn)
                affected.add(m)
        for ch in self._deleted:
            if d.is_group(ch.old or {}):
                for m in self._members(ch.old):
                    removed.setdefault(m, set()).add(ch.dn_norm)
                    affected.add(m)
        affected.update(added_norms)
        if not affected:
            return
        if d.nested_groups:
            self._recompute_nested(affected)
            return
        # Groups that already list the new entries: one query for all of them (bulk adds).
        added = set(added_norms)
        short = [n for n in added if len(n) < INDEX_VALUE_MAX]
        listed = store.groups_listing_txn(self.txn, [a.lower() for a in GROUP_ATTRS], short) if short else {}
        for norm in affected:
            st = self._staged.get(norm)
            if st is None:
                e = store.get_entry_txn(self.txn, norm, for_update=True)
                if e is None:
                    continue
                st = self.track(e)
            if st.attrs is None:
                continue
            current = st.attrs.get("memberOf", [])
            drop = removed.get(norm, set())
            keep = [v for v in current if d.dn_norm_or_none(v) not in drop]
            have = {d.dn_norm_or_none(v) for v in keep}
            add = addto.get(norm, {})
            if norm in added:
                if len(norm) < INDEX_VALUE_MAX:
                    for gnorm, gdn in listed.get(norm, ()):
                        add.setdefault(gnorm, gdn)
                else:
                    for g in self._groups_of(norm):
                        add.setdefault(g.dn_norm, g.dn)
            for gnorm, gdn in add.items():
                if gnorm not in have:
                    keep.append(gdn)
                    have.add(gnorm)
            if keep != current:
                attrs = dict(st.attrs)
                if keep:
                    attrs["memberOf"] = keep
                else:
                    attrs.pop("memberOf", None)
                self.update(st, attrs, stamp=False)  # operational upkeep, like the memberOf overlay

    def _groups_of(self, norm: str) -> list[StoredEntry]:
        out: dict[str, StoredEntry] = {}
        for attr in GROUP_ATTRS:
            for g in store.entries_with_value_txn(self.txn, attr.lower(), norm):
                out[g.dn_norm] = g
        return list(out.values())

    def _recompute_nested(self, affected: set[str]) -> None:
        d = self.directory
        # Members of affected groups are affected too (downwards closure).
        todo = list(affected)
        seen = set(affected)
        while todo:
            n = todo.pop()
            e = store.get_entry_txn(self.txn, n)
            if e is not None and d.is_group(e.attrs):
                for m in self._members(e.attrs):
                    if m not in seen:
                        seen.add(m)
                        todo.append(m)
        for norm in seen:
            e = store.get_entry_txn(self.txn, norm, for_update=True)
            if e is None:
                continue
            # Upward closure: every group reachable through member links.
            groups: dict[str, str] = {}
            frontier = [norm]
            visited = {norm}
            while frontier:
                cur = frontier.pop()
                for g in self._groups_of(cur):
                    if g.dn_norm not in groups:
                        groups[g.dn_norm] = g.dn
                    if g.dn_norm not in visited:
                        visited.add(g.dn_norm)
                        frontier.append(g.dn_norm)
            groups.pop(norm, None)
            st = self._staged.get(norm) or self.track(e)
            if st.attrs is None:
                continue
            current = st.attrs.get("memberOf", [])
            if {d.dn_norm_or_none(v) for v in current} != set(groups):
                attrs = dict(st.attrs)
                if groups:
                    attrs["memberOf"] = sorted(groups.values(), key=str.lower)
                else:
                    attrs.pop("memberOf", None)
                self.update(st, attrs, stamp=False)
