"""The directory's one seam to what follows a write: :class:`ChangeSet`, :class:`Origin`, :class:`WriteHooks`.

Owns the contract between a write and whoever reacts to it (the Microsoft 365
outbox planner in ``sync/planner.py``, the activation links in
``selfservice/links.py``).  The directory defines it; the wiring (``tap.py``,
``services.py``, the CLI, test fixtures) builds the hooks and hands them to
``Directory(config, db, hooks=...)``.  Nothing here is global: two directories
in one process have their own hooks.

::

    Write.finish()  (directory/writes.py, inside the write's transaction)
       ├─ entries and index rows flushed
       ├─ for hook in directory.hooks: hook.on_change_txn(txn, changeset)
       │     may INSERT rows of its own, ask for status values (changeset.request_status),
       │     schedule work after COMMIT (txn.call_after), or raise LDAPError: the write rolls back
       └─ the status values asked for are stored in the same transaction
    Directory.authenticate  (a successful bind of an entry flagged o365PasswordPending)
       └─ for hook in directory.hooks: await hook.on_bind(dn, password)

Every write says where it comes from (:class:`Origin`); the origin decides what
follows it, here and nowhere else.  This module imports nothing above the
store: no hook implementation is named here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from ldapsync.store.database import Txn
from ldapsync.store.entries import EntryChange

if TYPE_CHECKING:
    from ldapsync.directory.dn import DN

StatusValues = dict[str, list[str] | None]        # attribute → values (list) or removal (None)


class Origin(StrEnum):
    """Who makes a write.  What follows a write depends on this alone (see the properties)."""

    LDAP = "ldap"                  # an LDAP client: add, modify, delete, modDN, Password Modify
    PAGES = "pages"                # the self-service pages: a password set with a link or changed by its user
    CLI = "cli"                    # `ldapsync ldif load`, `ldapsync user unlock`
    IMPORT = "import"              # `ldapsync o365 import`: users taken over from Microsoft 365
    BOOTSTRAP = "bootstrap"        # the base tree and the admin entry (`ldapsync init`, first start)
    POLICY = "policy"              # password-policy bookkeeping at bind (failures, lockout, grace)
    LINKS = "links"                # self-service link bookkeeping (ldapsyncActivationExpires, expiry warned)
    CONNECTOR = "connector"        # the connector's own entries and their status
    DEACTIVATE = "deactivate"      # `o365 deactivate`: every binding removed, Microsoft 365 left as it is
    SYNC_STATUS = "sync-status"    # status the worker, reconciler or bind capture writes back (o365*)

    @property
    def reaches_microsoft365(self) -> bool:
        """The outbox planner looks at this write: it may queue rows, and refuses a bound user's
        mail on an unverified domain.  Never for the writes that only record Microsoft 365's or the
        connector's state (that would queue work for work done), nor for the bootstrap or a
        deactivation, nor for policy and link bookkeeping: they change no Graph property, and the
        planner's checks (a bound user's mail) must never refuse the recording of a failed bind."""
        return self not in _NOT_TO_MICROSOFT365

    @property
    def queues_activation(self) -> bool:
        """The activation hook looks at this write: a user bound without a password gets a link,
        a user who got a password has its live link revoked."""
        return self not in _NO_ACTIVATION


_NOT_TO_MICROSOFT365 = frozenset({Origin.BOOTSTRAP, Origin.CONNECTOR, Origin.DEACTIVATE, Origin.SYNC_STATUS,
                                  Origin.POLICY, Origin.LINKS})
_NO_ACTIVATION = frozenset({Origin.BOOTSTRAP, Origin.CONNECTOR, Origin.SYNC_STATUS, Origin.POLICY, Origin.LINKS})


@dataclass
class ChangeSet:
    """Everything one write changed, as the hooks see it (built by ``Write.finish``)."""

    operation: str                  # names the write in logs: "add", "modify", "passwd", "load", ...
    actor_dn: str
    origin: Origin
    changes: list[EntryChange] = field(default_factory=list)
    # The cleartext passwords the client sent, by normalized DN (never stored, never logged): the
    # outbox encrypts them for Microsoft 365.
    cleartext: Mapping[str, list[str]] = field(default_factory=dict)
    # Operational values hooks ask for on entries of this write (e.g. o365SyncState: pending),
    # by normalized DN; stored in the same transaction after the hooks ran.
    status_updates: dict[str, StatusValues] = field(default_factory=dict)

    def request_status(self, dn_norm: str, values: StatusValues) -> None:
        """Ask for operational ``values`` on the entry ``dn_norm`` (merged with other hooks' asks)."""
        self.status_updates.setdefault(dn_norm, {}).update(values)


class WriteHooks(Protocol):
    """What the directory calls out to; built and handed in by the wiring."""

    def on_change_txn(self, txn: Txn, cs: ChangeSet) -> None:
        """Inside every write's transaction, after its entries are flushed (see the module docstring)."""

    async def on_bind(self, dn: DN, password: bytes) -> None:
        """After a successful bind of an entry flagged ``o365PasswordPending``: the cleartext
        password Microsoft 365 is missing.  Errors are logged; the bind succeeds anyway."""
