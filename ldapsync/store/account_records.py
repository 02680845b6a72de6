"""SQL for ``o365_account_records``: the link to a Microsoft 365 account that outlives the binding
and the entry.

A user that was ever bound (and so may have a Microsoft 365 account ldapsync made or took over)
keeps a row here once it is unbound or its entry is deleted: entryUUID, the account's object id
(lower case; NULL while it is not known yet: a delete before the create was delivered), the
sign-in name (UPN) and DN it had, its state (``unbound``, ``deleted``, or ``bound`` once bound
again) and when that was recorded.  The row is written in the transaction of the LDAP write that unbound or deleted the
user (the outbox planner's hook, ``ldapsync/sync/account_records.py``), so the link is never lost,
and is never deleted by ldapsync: the account stays blocked for good, and the reconcilers
(``sync/reconciler.py``, ``sync/full_reconcile.py``) keep it so when someone re-enables it in the
portal.  Binding the user again keeps the row (the user is still "ever bound").  The worker also
writes a ``bound`` row when its create made the account (:func:`note_created_txn`): an account
ldapsync created is its own to keep blocked while Microsoft 365 lacks the user's password, unlike
one it linked (import, soft match).

SQL only: what a record means for Microsoft 365 is ``sync/account_records.py``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ldapsync.store.database import Txn

UNBOUND = "unbound"
DELETED = "deleted"
BOUND = "bound"          # bound again after an unbind: still ever bound, not to be blocked

_COLS = "entry_uuid, object_id, upn, dn, state, recorded_at"


@dataclass(frozen=True)
class AccountRecord:
    entry_uuid: str
    object_id: str | None       # lower case; None: not known yet (deleted before the create was delivered)
    upn: str | None
    dn: str | None
    state: str                  # UNBOUND | DELETED | BOUND
    recorded_at: float


def _row(r: Sequence[Any]) -> AccountRecord:
    return AccountRecord(str(r[0]), r[1], r[2], r[3], str(r[4]), float(r[5]))


def note_txn(txn: Txn, entry_uuid: str, object_id: str | None, upn: str | None, dn: str | None,
             state: str, now: float) -> None:
    """Record (or update) the user's link; an object id already known is kept when none is given."""
    txn.run(
        "INSERT INTO o365_account_records (entry_uuid, object_id, upn, dn, state, recorded_at) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (entry_uuid) DO UPDATE SET "
        "object_id = COALESCE(excluded.object_id, o365_account_records.object_id), "
        "upn = COALESCE(excluded.upn, o365_account_records.upn), dn = excluded.dn, "
        "state = excluded.state, recorded_at = excluded.recorded_at",
        (entry_uuid, object_id.lower() if object_id else None, upn, dn, state, now))


def note_created_txn(txn: Txn, entry_uuid: str, object_id: str, upn: str | None, dn: str | None,
                     now: float, state: str = BOUND) -> None:
    """ldapsync created this account (it is ours to keep blocked): a record in ``state`` (``bound``;
    ``unbound``/``deleted`` when the create's reply was lost and the user was unbound or deleted
    before the retry found the account), or the object id on the record there is (a delete may
    have been recorded before the create's reply came)."""
    txn.run(
        "INSERT INTO o365_account_records (entry_uuid, object_id, upn, dn, state, recorded_at) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (entry_uuid) DO UPDATE SET "
        "object_id = COALESCE(o365_account_records.object_id, excluded.object_id)",
        (entry_uuid, object_id.lower(), upn, dn, state, now))


def note_deleted_account_txn(txn: Txn, entry_uuid: str, object_id: str, upn: str | None, dn: str | None,
                             now: float) -> None:
    """The worker delivered a deleted user's row for this account: the user's record is ``deleted``,
    whatever the delete found when it ran (it notes nothing for a user neither bound nor blocked
    then: unbound before its create's reply came, deleted before its unbind was delivered)."""
    txn.run(
        "INSERT INTO o365_account_records (entry_uuid, object_id, upn, dn, state, recorded_at) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (entry_uuid) DO UPDATE SET state = excluded.state, "
        "object_id = COALESCE(o365_account_records.object_id, excluded.object_id)",
        (entry_uuid, object_id.lower(), upn, dn, DELETED, now))


def mark_bound_txn(txn: Txn, entry_uuid: str) -> None:
    """The user is bound again (its record, if any, stays: it is still ever bound)."""
    txn.run("UPDATE o365_account_records SET state = ? WHERE entry_uuid = ? AND state = ?",
            (BOUND, entry_uuid, UNBOUND))


def set_object_id_txn(txn: Txn, entry_uuid: str, object_id: str) -> int:
    """The account id learned after the record was written (a create delivered after the delete)."""
    cur = txn.run("UPDATE o365_account_records SET object_id = ? WHERE entry_uuid = ? AND object_id IS NULL",
                  (object_id.lower(), entry_uuid))
    return int(cur.rowcount or 0)


def by_object_id_txn(txn: Txn, object_id: str) -> AccountRecord | None:
    rows = txn.rows(f"SELECT {_COLS} FROM o365_account_records WHERE object_id = ?", (object_id.lower(),))
    return _row(rows[0]) if rows else None


def by_entry_uuid_txn(txn: Txn, entry_uuid: str) -> AccountRecord | None:
    rows = txn.rows(f"SELECT {_COLS} FROM o365_account_records WHERE entry_uuid = ?", (entry_uuid,))
    return _row(rows[0]) if rows else None


def page_txn(txn: Txn, after: str, limit: int) -> list[AccountRecord]:
    """Records in entryUUID order after ``after`` (``""``: from the start), at most ``limit``."""
    return [_row(r) for r in txn.rows(
        f"SELECT {_COLS} FROM o365_account_records WHERE entry_uuid > ? ORDER BY entry_uuid LIMIT ?",
        (after, limit))]


def count_txn(txn: Txn) -> dict[str, int]:
    out = {UNBOUND: 0, DELETED: 0}
    for state, n in txn.rows("SELECT state, COUNT(*) FROM o365_account_records GROUP BY state"):
        out[str(state)] = int(n)
    return out
