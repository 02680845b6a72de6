"""Who is bound to Microsoft 365 and how their sync stands: the read model of ``ldapsync o365 users``
and of the user counts of ``ldapsync o365 status``.  Users with a held change are listed too, bound
or not (the guard holds disables, i.e. mostly users just unbound).

A user is bound by the value ``office365`` of ``ldapsyncDirectory`` or by membership of the tag
group (``sync/connector.py`` ``tag_dn``), as ``OutboxPlanner.is_bound`` decides.  Its state is
its ``o365SyncState`` (pending, synced, error, disabled; ``sync/status.py``), and "held" when a
change of it waits in the outbox for ``ldapsync o365 release`` (``store/outbox.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ldapsync.store import entries as store
from ldapsync.store.database import Txn
from ldapsync.store.entries import StoredEntry
from ldapsync.store.outbox import held_users_txn
from ldapsync.sync.connector import DIRECTORY_VALUE, tag_dn
from ldapsync.store.entries import first
from ldapsync.sync.status import entry_by_uuid_txn

if TYPE_CHECKING:
    from ldapsync.directory.facade import Directory

USER_STATES = ("error", "pending", "held", "synced", "disabled")


@dataclass(frozen=True)
class BoundUser:
    dn: str
    mail: str | None              # what becomes the userPrincipalName
    state: str | None             # o365SyncState; None before the planner has seen the user
    last_error: str | None
    held: bool                    # a change of it is held by the mass-disable guard
    bound: bool = True            # False: listed only for its held change

    def is_in(self, state: str) -> bool:
        return self.held if state == "held" else self.state == state


def bound_entries_txn(d: Directory, txn: Txn) -> dict[str, StoredEntry]:
    """Every bound entry (direct or by the tag), by normalized DN."""
    found = {e.dn_norm: e for e in store.entries_with_value_txn(txn, "ldapsyncdirectory", DIRECTORY_VALUE)}
    tag = store.get_entry_txn(txn, tag_dn(d).norm)
    if tag is not None:
        norms = [n for n in (d.dn_norm_or_none(v) for v in tag.attrs.get("member", ())) if n and n not in found]
        found.update(store.get_entries_txn(txn, norms))
    return found


def bound_users_txn(d: Directory, txn: Txn) -> list[BoundUser]:
    """Every bound user, sorted by DN."""
    found = bound_entries_txn(d, txn)
    held = held_users_txn(txn)
    bound = set(found)
    seen = {first(e.attrs, "entryUUID") for e in found.values()}
    for uuid in sorted(held - seen):
        e = entry_by_uuid_txn(d, txn, uuid)
        if e is not None:
            found[e.dn_norm] = e
    users = [BoundUser(e.dn, first(e.attrs, "mail"), first(e.attrs, "o365SyncState"),
                       first(e.attrs, "o365LastError"), first(e.attrs, "entryUUID") in held,
                       bound=e.dn_norm in bound)
             for e in found.values()]
    return sorted(users, key=lambda u: u.dn.lower())


def user_counts(users: list[BoundUser]) -> dict[str, int]:
    """Bound users per o365SyncState ("bound": all of them); "held": users with a held change."""
    counts = {s: sum(1 for u in users if u.bound and u.is_in(s)) for s in USER_STATES if s != "held"}
    counts["bound"] = sum(1 for u in users if u.bound)
    counts["held"] = sum(1 for u in users if u.held)
    return counts
