"""Ever-bound users: what the link to a Microsoft 365 account that outlives the binding and the
entry means (the SQL is ``ldapsync/store/account_records.py``).

- :func:`note_change_txn` is called by the outbox planner (``sync/outbox.py``), inside the LDAP
  write's transaction, when a bound user is unbound or an ever-bound user's entry is deleted: it
  records entryUUID, object id, UPN and DN, so ldapsync still knows the account is its own and
  must stay blocked after the entry is gone;
- :func:`ever_bound` says whether an existing entry is such a user (its Microsoft 365 account,
  if any, must be blocked while it is not bound);
- :func:`record_desired` is the desired state of a deleted user's account (blocked), built with
  the planner's own ``desired()`` from what the record kept.

Imported users that were never bound (``o365ObjectId`` but no ``o365SyncState``) are not ever
bound: their accounts were never ldapsync's to block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ldapsync.store import account_records as records
from ldapsync.store.database import Txn
from ldapsync.store.entries import Attrs, EntryChange

if TYPE_CHECKING:
    from ldapsync.sync.outbox import DesiredUser, OutboxPlanner


def _first(attrs: Attrs | None, name: str) -> str | None:
    v = (attrs or {}).get(name)
    return v[0] if v else None


def note_change_txn(planner: "OutboxPlanner", txn: Txn, ch: EntryChange, was_bound: bool) -> None:
    """The planner's hook for a delete, or an unbind (``was_bound`` and not bound now)."""
    old = ch.old
    if old is None:
        return
    uuid = _first(old, "entryUUID")
    if not uuid:
        return
    if ch.kind == "delete":
        if not (was_bound or old.get("o365SyncState")):
            return                       # never bound (or imported and never bound): not ours
        state = records.DELETED
    else:
        if not (_first(old, "o365ObjectId") or _first(ch.new, "o365ObjectId")):
            return                       # never reached Microsoft 365: no account to keep blocked
        state = records.UNBOUND
    oid = _first(old, "o365ObjectId") or _first(ch.new, "o365ObjectId")
    records.note_txn(txn, uuid, oid, _first(old, "mail"), ch.dn, state, planner.clock())


def ever_bound(attrs: Attrs, record: records.AccountRecord | None) -> bool:
    """An existing entry that ldapsync bound once (its account is ldapsync's to keep blocked)."""
    return record is not None or attrs.get("o365SyncState") == ["disabled"]


def record_desired(planner: "OutboxPlanner", rec: records.AccountRecord, reason: str) -> "DesiredUser":
    """A deleted user's account: blocked (``bound=False, deleted=True``), never deleted in Graph."""
    attrs: Attrs = {"entryUUID": [rec.entry_uuid]}
    if rec.upn:
        attrs["mail"] = [rec.upn]
    if rec.object_id:
        attrs["o365ObjectId"] = [rec.object_id]
    return planner.desired(attrs, rec.dn or "", bound=False, reason=reason, deleted=True)
