"""An expired directory password blocks Microsoft 365 sign-in (``[office365] expired_password_action``).

Owns the rule and the sweep that applies it.  With ``expired_password_action = "block"`` (the
default), a bound user whose directory password has expired (``[policy] max_age`` after its
``pwdChangedTime``, as ``directory/policy.py`` decides for binds; grace logins do not count: they
exist for LDAP clients, Microsoft 365 never sees them) is blocked in Microsoft 365, with the reason
in ``o365LastError``, and enabled again as soon as a new password is set.  ``"none"`` leaves the
account as it is (the directory password's age is then the directory's business only).

Two halves:

- the desired state (:func:`blocks_sign_in`): the outbox planner (``sync/planner.py``
  ``desired_fields``) asks it for every row it queues, and the reconcilers get their desired state
  from there too, so while the password is expired every component wants the account blocked
  (``bound`` False, reason :data:`REASON`) and a portal re-enable is undone like any drift; a
  new password makes the next row say enabled again (pages, ``ldappasswd``, ``ldapmodify``);
- the sweep (:class:`ExpirySweep`, every ``reconcile_interval`` in the worker process: started by
  ``services.py: OutboxWorkerService``): time alone makes a password expire, with no write to plan
  a row, so the sweep queues the disable for each bound, linked user whose password has expired
  since, and marks it (``o365LastError`` = :data:`EXPIRED_ERROR`, ``o365SyncState: pending``).  It
  also queues the enable for a marked user whose password is no longer expired without a write
  that queued one (a hash set with ``ldapmodify``, ``max_age`` raised, the action set to "none").

Each user is decided under its row lock (``Write.track``), so several nodes sweeping at once queue
one row.  A sweep that would block more users than ``disable_threshold`` holds them for an admin,
like the planner (``ldapsync o365 release``).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.logger import Logger

from ldapsync.directory import policy as pp
from ldapsync.directory.errors import LDAPError
from ldapsync.directory.hooks import Origin, StatusValues
from ldapsync.directory.writes import Write
from ldapsync.store import outbox as outbox_store
from ldapsync.store.database import Txn
from ldapsync.store.entries import Attrs
from ldapsync.sync.users import bound_entries_txn

if TYPE_CHECKING:
    from ldapsync.directory.core import DirectoryCore
    from ldapsync.directory.facade import Directory
    from ldapsync.sync.planner import DesiredUser, OutboxPlanner

log = Logger()

ACTIONS = ("block", "none")
REASON = "expired"          # the reason of a row that blocks a user for its expired password
EXPIRED_ERROR = ("the directory password has expired: sign-in to Microsoft 365 is blocked until a new "
                 "password is set (self-service pages, ldappasswd or an admin)")
SWEEP_OPERATION = "o365-expiry"


def blocks_sign_in(directory: DirectoryCore, attrs: Attrs, now: float | None = None) -> bool:
    """Whether this user's Microsoft 365 account must be blocked because its directory password
    has expired (and ``expired_password_action`` is "block").  The rule of ``policy.expires_at``
    (what binds obey); the planner asks it for every row, so the time value is parsed once."""
    policy = directory.policy
    if not policy.max_age or directory.config.office365.expired_password_action != "block" \
            or not attrs.get("userPassword"):
        return False
    changed = None
    for v in attrs.get("pwdChangedTime", ()):
        changed = _parse_time(v)
        if changed is not None:
            break
    if changed is None:
        return False            # no age yet: it starts at the next successful bind (policy.py)
    return (directory.clock.now() if now is None else now) >= changed + policy.max_age


@functools.lru_cache(maxsize=4096)
def _parse_time(value: str) -> float | None:
    return pp.parse_time(value)


def entry_error(desired: DesiredUser) -> list[str] | None:
    """``o365LastError`` for a user the worker has just blocked: the reason when it was the expiry."""
    return [EXPIRED_ERROR] if desired.reason == REASON else None


def _marked(attrs: Attrs) -> bool:
    return (attrs.get("o365LastError") or [None])[0] == EXPIRED_ERROR


def left_to_the_sweep(directory: DirectoryCore, attrs: Attrs, now: float | None = None) -> bool:
    """A bound user whose password has expired since the sweep last looked, on a linked account
    not known to be blocked already: the sweep blocks it, and holds the blocks of a mass expiry
    for an admin (``disable_threshold``).  The reconcilers leave such a user to the sweep (within
    ``reconcile_interval``): queued one by one as drift, thousands of accounts whose passwords
    expired at once (``[policy] max_age`` lowered) would be blocked past the guard.  While the
    password is expired only ``accountEnabled`` is compared, so nothing else waits."""
    return blocks_sign_in(directory, attrs, now) and _to_mark(attrs)


def _to_mark(attrs: Attrs) -> bool:
    """Not marked yet, on a linked account not known to be blocked already."""
    return (not _marked(attrs) and bool(attrs.get("o365ObjectId"))
            and (attrs.get("o365SyncState") or [""])[0] not in ("disabled", "error"))


@dataclass
class SweepReport:
    blocked: list[str] = field(default_factory=list)     # DNs whose disable was queued
    unblocked: list[str] = field(default_factory=list)   # DNs whose enable was queued
    held: bool = False


class ExpirySweep:
    """One pass: queue the disables (and enables) that time alone made necessary."""
    def __init__(self, directory: Directory, planner: OutboxPlanner, *, wake: Callable[[], None] | None = None) -> None:
        self.d = directory
        self.planner = planner
        self.wake = wake

    async def run_once(self) -> SweepReport:
        report = await self.d.db.run_interaction("expiry sweep", self._sweep_txn)
        if report.blocked or report.unblocked:
            log.info("password expiry: {b} user(s) to block in Microsoft 365{h}, {u} to enable again",
                     b=len(report.blocked), h=" (held: more than disable_threshold)" if report.held else "",
                     u=len(report.unblocked))
            if self.wake is not None:
                self.wake()
        return report

    def _sweep_txn(self, txn: Txn) -> SweepReport:
        report = SweepReport()
        now = self.d.clock.now()
        todo = []
        for e in bound_entries_txn(self.d, txn).values():
            if self._needs_row(e.attrs, now):
                todo.append(e)
        if not todo:
            return report
        w = Write(self.d, txn, str(self.d.admin_dn), SWEEP_OPERATION, Origin.SYNC_STATUS)
        rows: list[tuple[DesiredUser, str]] = []
        for e in todo:
            try:
                st = w.track(e)                   # under its row lock: another node may have just done it
            except LDAPError:
                continue                          # deleted meanwhile
            attrs = st.attrs or {}
            if not self.planner.is_bound(attrs) or not self._needs_row(attrs, now):
                continue
            desired = self.planner.desired(attrs, str(st.dn), bound=True, reason="update")   # blocked if expired
            status: StatusValues = {"o365SyncState": ["pending"]}
            if not desired.bound:
                status["o365LastError"] = [EXPIRED_ERROR]
                report.blocked.append(str(st.dn))
            elif outbox_store.queue_covers_txn(txn, desired.entry_uuid):
                continue                          # a queued row (the new password's) will enable it
            else:
                report.unblocked.append(str(st.dn))
            rows.append((desired, REASON if not desired.bound else "unexpired"))
            w.set_operational(st, status)
        if not rows:
            return report
        w.finish()
        report.held = len(report.blocked) > self.planner.disable_threshold
        t = time.time()
        outbox_store.queue_rows_txn(txn, [
            outbox_store.QueuedRow(desired.entry_uuid, t, operation, desired.to_json(), None,
                                   "held" if report.held and not desired.bound else "ready")
            for desired, operation in rows])
        outbox_store.notify_txn(txn)
        return report

    def _needs_row(self, attrs: Attrs, now: float) -> bool:
        """Expired and not marked, on a linked account not known to be blocked already (an account
        never created has nothing to block: the planner's rows say blocked until a new password;
        one in error waits for an admin, as after any permanent Graph error); or marked and no
        longer expired."""
        if blocks_sign_in(self.d, attrs, now):
            return _to_mark(attrs)
        return _marked(attrs)
