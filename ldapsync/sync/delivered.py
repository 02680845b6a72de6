"""What a delivery leaves in the database once Graph has answered (the worker's completion).

The worker (``sync/worker.py``) claims a user's queued rows, maps them onto Graph calls
(``sync/graph_mapping.py``) and, in one write transaction that first checks its claim is still its
own, records the :class:`Outcome` here and deletes the rows:

- the user's status attributes (``o365SyncState``, ``o365ObjectId``...; ``o365PasswordPending``
  kept when a newer password is still on its way: ``password_plan.pending_kept_txn``);
- the account record (``store/account_records.py``): deleted when the entry is gone (deleted while
  this delivery, or the create or unbind before it, was on its way: the delete noted nothing
  then), created when our create made the account;
- the notes of a create or a password in flight, done with now, and the fingerprint of the
  password Microsoft 365 holds;
- a "choose another password" request, a welcome link, a password kept again for a later binding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ldapsync.store import account_records
from ldapsync.store import links as links_q
from ldapsync.store import outbox as outbox_q
from ldapsync.store import unbound_passwords as kept_q
from ldapsync.store.database import Txn
from ldapsync.store.entries import Attrs
from ldapsync.sync.graph_mapping import Outcome
from ldapsync.sync.password_plan import REFUSED_REASON, ask_for_new_password_txn, pending_kept_txn
from ldapsync.sync.planner import DesiredUser
from ldapsync.sync.status import entry_by_uuid_txn, write_user_status_txn

if TYPE_CHECKING:
    from ldapsync.directory.facade import Directory


def record_outcome_txn(d: Directory, txn: Txn, entry_uuid: str, ids: Sequence[int], desired: DesiredUser,
                       out: Outcome, secret: str | None, pushed_fp: str | None, now: float) -> None:
    """Record ``out``, the outcome of delivering the rows ``ids`` (``desired``: the newest; ``secret``:
    the queued password it carried; ``pushed_fp``: that password's fingerprint), and complete them."""
    last = ids[-1]
    gone = desired.deleted
    if out.status is not None:
        def current() -> Attrs | None:      # read only when a pushed password is in question
            e = entry_by_uuid_txn(d, txn, entry_uuid)
            return e.attrs if e is not None else None

        gone = not write_user_status_txn(d, txn, entry_uuid, pending_kept_txn(
            txn, out.status, entry_uuid, last, current, pushed_fp))
    if gone and out.object_id:
        account_records.note_deleted_account_txn(txn, entry_uuid, out.object_id, desired.upn, desired.dn, now)
    if out.password_refused:
        ask_for_new_password_txn(txn, entry_uuid, now, REFUSED_REASON)
    if out.welcome:
        links_q.queue_txn(txn, entry_uuid, links_q.WELCOME, now, "Microsoft 365 account created")
    if out.object_id and out.object_id != desired.object_id:
        # the account id is new to these rows (created or linked now): later rows get it, and the
        # note of a create in flight is done with (our create made it: a record)
        if outbox_q.create_was_sent_txn(txn, entry_uuid):
            state = (account_records.DELETED if desired.deleted else account_records.BOUND if desired.bound
                     else account_records.UNBOUND)
            account_records.note_created_txn(txn, entry_uuid, out.object_id, desired.upn, desired.dn, now, state)
        outbox_q.set_object_id_in_later_rows_txn(txn, entry_uuid, last, out.object_id)
        outbox_q.clear_create_sent_txn(txn, entry_uuid)
    if secret is not None:
        outbox_q.clear_password_sent_txn(txn, entry_uuid)   # delivered: the note is done with
        if pushed_fp and not (out.password_refused or out.unsent_secret or desired.deleted):
            outbox_q.note_password_pushed_txn(txn, entry_uuid, pushed_fp)
    ttl = d.config.office365.unbound_password_ttl
    if out.unsent_secret is not None and ttl > 0:
        kept_q.keep_unless_newer_txn(txn, entry_uuid, out.unsent_secret, now, now + ttl)
    outbox_q.complete_txn(txn, ids)
