"""Sync status on each bound user: ``o365ObjectId``, ``o365SyncState``, ``o365SyncedAt``, ``o365LastError``.

Written by the worker through a :class:`~ldapsync.directory.writes.Write`
of origin :attr:`~ldapsync.directory.hooks.Origin.SYNC_STATUS`, which the
outbox planner ignores (so a status write never queues more work).  Runs inside the caller's transaction;
no network here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.hooks import Origin, StatusValues
from ldapsync.directory.writes import Write
from ldapsync.store import entries as store
from ldapsync.store.database import Txn
from ldapsync.store.entries import StoredEntry

if TYPE_CHECKING:
    from ldapsync.directory.facade import Directory

STATUS_OPERATION = "o365-status"
USER_STATUS_ATTRS = ("o365ObjectId", "o365SyncState", "o365SyncedAt", "o365LastError")


class SyncState(StrEnum):
    pending = "pending"
    synced = "synced"
    error = "error"
    disabled = "disabled"


def entry_by_uuid_txn(d: Directory, txn: Txn, entry_uuid: str) -> StoredEntry | None:
    """The entry whose ``entryUUID`` is ``entry_uuid`` (stable across renames), or None."""
    norm = next((v for k, v in d.index_rows({"entryUUID": [entry_uuid]}) if k == "entryuuid"), entry_uuid.lower())
    ids = store.ids_with_value_txn(txn, "entryuuid", norm)
    for e in store.get_entries_by_id_txn(txn, ids):
        if any(v.lower() == entry_uuid.lower() for v in e.attrs.get("entryUUID", ())):
            return e
    return None


def write_user_status_txn(d: Directory, txn: Txn, entry_uuid: str, values: StatusValues,
                          operation: str = STATUS_OPERATION, origin: Origin = Origin.SYNC_STATUS) -> bool:
    """Set (list) or remove (None) status attributes on the user; False when the entry is gone.
    ``operation`` names the write, ``origin`` says who makes it (the self-service bookkeeping is
    :attr:`Origin.LINKS`)."""
    e = entry_by_uuid_txn(d, txn, entry_uuid)
    if e is None:
        return False
    w = Write(d, txn, str(d.admin_dn), operation, origin)
    try:
        st = w.track(e)       # read again under a lock: never the stale copy (a rename may have committed)
    except LDAPError as err:
        if err.code == ResultCode.noSuchObject:
            return False
        raise
    if w.set_operational(st, values):
        w.finish()
    return True
