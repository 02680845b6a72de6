"""Ever-bound users: what the link to a Microsoft 365 account that outlives the binding and the
entry means (the SQL is ``ldapsync/store/account_records.py``).

- :func:`note_change_txn` is called by the outbox planner (``sync/planner.py``), inside the LDAP
  write's transaction, when a user is bound or unbound or an ever-bound user's entry is deleted:
  it records entryUUID, object id, UPN and DN, so ldapsync still knows the account is its own and
  must stay blocked after the entry is gone; binding the user again marks the record ``bound``;
- :func:`ever_bound` says whether an existing entry that is not bound is such a user whose
  account ldapsync blocked (and keeps blocked).

``ldapsync o365 deactivate`` unbinds everyone without touching Microsoft 365 and without this
hook (its writes do not reach Microsoft 365): those users' records stay ``bound`` and their
accounts are left as they are, after ``reactivate`` too.
- :func:`record_desired` is the desired state of a deleted user's account (blocked), built with
  the planner's own ``desired()`` from what the record kept.

Imported users that were never bound (``o365ObjectId`` but no ``o365SyncState``) are not ever
bound: their accounts were never ldapsync's to block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ldapsync.store import account_records as records
from ldapsync.store import outbox as outbox_q
from ldapsync.store.database import Txn
from ldapsync.store.entries import Attrs, EntryChange, first
from ldapsync.sync.status import entry_by_uuid_txn

if TYPE_CHECKING:
    from ldapsync.directory.facade import Directory
    from ldapsync.sync.planner import DesiredUser, OutboxPlanner


def note_change_txn(planner: "OutboxPlanner", txn: Txn, ch: EntryChange, was_bound: bool, now_bound: bool) -> None:
    """The planner's hook for a delete, an unbind or a bind (``was_bound`` != ``now_bound``)."""
    old = ch.old
    if old is None:
        return                           # an add: nothing recorded yet
    uuid = first(old, "entryUUID")
    if not uuid:
        return
    oid = first(old, "o365ObjectId") or first(ch.new, "o365ObjectId")
    if ch.kind != "delete" and now_bound:
        if oid:
            records.mark_bound_txn(txn, uuid)   # bound again: ever bound, not to be blocked
        return
    if ch.kind == "delete":
        if not (was_bound or old.get("o365SyncState") == ["disabled"]):
            rec = records.by_entry_uuid_txn(txn, uuid)
            if rec is None or rec.state != records.UNBOUND:
                return                   # never bound, imported, or unbound by deactivate: not ours to block
        state = records.DELETED
    else:
        if not oid:
            return                       # never reached Microsoft 365: no account to keep blocked
        state = records.UNBOUND
    records.note_txn(txn, uuid, oid, first(old, "mail"), ch.dn, state, planner.wall_time())


def user_deleted_txn(directory: "Directory", txn: Txn, record: records.AccountRecord) -> bool:
    """The record's user is deleted: recorded so, or its entry is gone and its rows are still in
    the outbox.  The second is a user deleted before the worker delivered its create or its
    unbind, which then recorded the account as bound: the delivery of the delete marks the record
    deleted, and until it is done, an account enabled in the portal is blocked all the same.  (A
    record whose entry is gone with nothing queued is a user deleted while ``o365 deactivate``
    left Microsoft 365 alone: so it stays.)"""
    return record.state == records.DELETED or (
        outbox_q.has_rows_txn(txn, record.entry_uuid) and entry_by_uuid_txn(directory, txn, record.entry_uuid) is None)


def ever_bound(attrs: Attrs, record: records.AccountRecord | None) -> bool:
    """An existing entry, not bound now, whose account ldapsync blocked (and keeps blocked):
    unbound while bound (the record), or its state says the unbind was delivered."""
    return (record is not None and record.state == records.UNBOUND) or attrs.get("o365SyncState") == ["disabled"]


def record_desired(planner: "OutboxPlanner", rec: records.AccountRecord, reason: str) -> "DesiredUser":
    """A deleted user's account: blocked (``bound=False, deleted=True``), never deleted in Graph."""
    attrs: Attrs = {"entryUUID": [rec.entry_uuid]}
    if rec.upn:
        attrs["mail"] = [rec.upn]
    if rec.object_id:
        attrs["o365ObjectId"] = [rec.object_id]
    return planner.desired(attrs, rec.dn or "", bound=False, reason=reason, deleted=True)
