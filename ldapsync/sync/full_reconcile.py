"""The full comparison: every bound and every ever-bound user against its Microsoft 365 account.

The delta reconciler (``sync/reconciler.py``) looks only at what changed in the tenant since its
last pass, so what it never saw stays wrong: an edit made in the portal before an unbind, a delta
link that was reset, an account whose link it no longer had.  Every ``[office365]
full_reconcile_interval`` (default 1 h; ``"0"`` turns the timer off) and on ``ldapsync o365
reconcile --full``, this pass compares them all and puts everything back:

- bound user: names, UPN/mail, mailNickname, ``passwordPolicies`` (DisablePasswordExpiration) and
  accountEnabled as the planner's desired state says (``OutboxPlanner.desired``; enabled when the
  directory holds a password Microsoft 365 has; while ``o365PasswordPending`` waits for it, an
  account ldapsync created or blocked is blocked again, a linked one keeps its state);
- unbound ever-bound user (``sync/account_records.py: ever_bound``), and a deleted user whose
  account ldapsync kept (``o365_account_records``): blocked;
- a bound user's account missing from the tenant: looked up by id, and if it is gone reported on
  the entry as the delta pass does (not recreated).

It reads the tenant with ``GET /users`` (``$top=999`` pages: a 10,000-user tenant is about a dozen
reads) and the directory in pages of 500 entries, and writes nothing to Graph itself: a user that
drifted gets an outbox row (reason ``drift``) with its desired state, and the worker puts it back,
paced within its share of the write budget like every other change (only what drifted is written;
a user with a ready row already is left to that row).  It runs under the reconciler's lease, so
one node at a time, and the time of the last completed pass is kept in ``meta``
(``o365.full_reconcile_at``) so that with several nodes the pass runs once per interval, not once
per node.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from twisted.logger import Logger

from ldapsync.directory.writes import now_generalized
from ldapsync.graph.errors import NotFound
from ldapsync.jsontypes import JSONObject
from ldapsync.store import account_records as records
from ldapsync.store import entries as store
from ldapsync.store.database import Txn
from ldapsync.store.entries import StoredEntry
from ldapsync.store.outbox import QueuedRow, queue_covers_txn, notify_txn, queue_rows_txn
from ldapsync.sync import expiry
from ldapsync.sync.account_records import ever_bound, record_desired, user_deleted_txn
from ldapsync.sync.graph_mapping import NO_EXPIRY
from ldapsync.sync.planner import DesiredUser
from ldapsync.sync.reconciler import SELECT, ReconcileReport, drift, drift_payload

if TYPE_CHECKING:
    from ldapsync.sync.reconciler import Reconciler

log = Logger()

META_FULL_AT = "o365.full_reconcile_at"     # time.time() of the last completed full pass (any node)
FULL_SELECT = (*SELECT, "passwordPolicies")
PAGE = 500


def full_due_txn(txn: Txn, interval: float) -> bool:
    """No node has completed a full pass for ``interval`` seconds."""
    last = store.get_meta_txn(txn, META_FULL_AT)
    try:
        return time.time() - float(last or 0) >= interval
    except ValueError:
        return True


def full_drift(desired: DesiredUser, remote: JSONObject, attrs: dict[str, list[str]], *,
               ours: bool = False) -> list[str]:
    """:func:`~ldapsync.sync.reconciler.drift`, and a bound user's ``passwordPolicies``."""
    out = drift(desired, remote, attrs, ours=ours)
    if desired.bound:
        policies = {p.strip() for p in (remote.get("passwordPolicies") or "").split(",")}
        if NO_EXPIRY not in policies:
            out.append("passwordPolicies")
    return out


class FullComparison:
    """One full pass, run by :meth:`Reconciler.run_once` (``full=True``) under its lease."""

    def __init__(self, rec: "Reconciler") -> None:
        self.rec = rec
        self.db = rec.db
        self.planner = rec.planner

    async def run(self) -> ReconcileReport:
        report = ReconcileReport(full=True, full_scan=True)
        started = now_generalized()
        accounts: dict[str, JSONObject] = {}
        async for u in self.rec.client.list_users(FULL_SELECT, top=999):
            await self.rec._keep_lease()
            if u.get("id"):
                accounts[u["id"].lower()] = u
        recs: dict[str, records.AccountRecord] = {}
        after = ""
        while True:
            page = await self.db.run_interaction("full reconcile records", records.page_txn, after, 5000, write=False)
            recs.update((r.entry_uuid, r) for r in page)
            if len(page) < 5000:
                break
            after = page[-1].entry_uuid
        seen_uuids: set[str] = set()
        missing: list[str] = []
        last_id = 0
        while True:
            await self.rec._keep_lease()
            # read in a read transaction (with SQLite, LDAP writes never wait behind the walk);
            # only what drifted is queued, in a short write transaction
            last_id, rows = await self.db.run_interaction("full reconcile", self._entries_txn, last_id, accounts,
                                                          recs, seen_uuids, missing, started, report, write=False)
            if rows:
                await self.db.run_interaction("full reconcile queue", self._queue_txn, rows, report)
            if last_id < 0:
                break
        # records of users whose entry was not walked: deleted ones (or whose entry is gone: checked
        # in the transaction, user_deleted_txn)
        deleted = [r for u, r in sorted(recs.items()) if u not in seen_uuids]
        for i in range(0, len(deleted), PAGE):
            await self.rec._keep_lease()
            await self.db.run_interaction("full reconcile deleted", self._records_txn, deleted[i:i + PAGE],
                                          accounts, report)
        await self._missing(missing, report)
        await self.db.run_interaction("full reconciled", store.set_meta_txn, META_FULL_AT, repr(time.time()))
        await self.db.run_interaction("reconciled", self.rec._stamp_txn)
        log.info("full reconcile: {n} account(s) compared, {d} drifted user(s) queued, {m} deleted in "
                 "Microsoft 365", n=report.seen, d=len(report.drifted), m=len(report.deleted))
        if report.drifted and self.rec.wake is not None:
            self.rec.wake()
        return report

    def _queue_txn(self, txn: Txn, rows: list[tuple[QueuedRow, str]], report: ReconcileReport) -> None:
        """Queue the drift rows (row, what to report) of users with no ready row meanwhile."""
        todo = [(r, what) for r, what in rows if not queue_covers_txn(txn, r.entry_uuid)]
        if todo:
            queue_rows_txn(txn, [r for r, _ in todo])
            notify_txn(txn)
            report.drifted.extend(what for _, what in todo)

    def _entries_txn(self, txn: Txn, after: int, accounts: dict[str, JSONObject],
                     recs: dict[str, records.AccountRecord], seen_uuids: set[str], missing: list[str],
                     started: str, report: ReconcileReport) -> tuple[int, list[tuple[QueuedRow, str]]]:
        """One page of linked entries (by entry id): the last id (-1 at the end) and the drift rows."""
        ids = [int(r[0]) for r in txn.rows(
            "SELECT DISTINCT entry_id FROM entry_index WHERE attr = ? AND entry_id > ? ORDER BY entry_id LIMIT ?",
            ("o365objectid", after, PAGE))]
        if not ids:
            return -1, []
        now = time.time()
        rows: list[tuple[QueuedRow, str]] = []
        for e in store.get_entries_by_id_txn(txn, ids):
            row = self._check_entry(e, accounts, recs, seen_uuids, missing, started, report, now)
            if row is not None:
                rows.append((row, e.dn))
        return ids[-1], rows

    def _check_entry(self, e: StoredEntry, accounts: dict[str, JSONObject],
                     recs: dict[str, records.AccountRecord], seen_uuids: set[str], missing: list[str],
                     started: str, report: ReconcileReport, now: float) -> QueuedRow | None:
        uuid = (e.attrs.get("entryUUID") or [""])[0]
        oid = (e.attrs.get("o365ObjectId") or [""])[0].lower()
        seen_uuids.add(uuid)
        bound = self.planner.is_bound(e.attrs)
        if not oid or not (bound or ever_bound(e.attrs, recs.get(uuid))):
            return None                 # imported and never bound: not ours to correct
        remote = accounts.get(oid)
        if remote is None:
            if bound and e.attrs.get("o365SyncState") != ["error"] and (e.attrs.get("o365SyncedAt") or [""])[0] < started:
                missing.append(oid)     # looked up by id after the walk
            return None
        report.seen += 1
        if bound and expiry.left_to_the_sweep(self.rec.d, e.attrs):
            return None                 # its password expired: the sweep blocks it (and guards a mass expiry)
        desired = self.planner.desired(e.attrs, e.dn, bound=bound, reason="drift")
        diffs = full_drift(desired, remote, e.attrs, ours=uuid in recs)
        if not diffs:
            return None
        return QueuedRow(desired.entry_uuid, now, "drift", drift_payload(desired, remote, diffs))

    def _records_txn(self, txn: Txn, recs: list[records.AccountRecord], accounts: dict[str, JSONObject],
                     report: ReconcileReport) -> None:
        """Deleted users whose account ldapsync kept: blocked."""
        now = time.time()
        rows: list[tuple[QueuedRow, str]] = []
        for r in recs:
            remote = accounts.get(r.object_id or "")
            if remote is None:
                continue                # not known yet, or deleted in Microsoft 365 too: nothing to block
            if not user_deleted_txn(self.rec.d, txn, r):
                continue                # its entry is there (not linked to an account now): not deleted
            report.seen += 1
            desired = record_desired(self.planner, r, "drift")
            if drift(desired, remote):
                rows.append((QueuedRow(r.entry_uuid, now, "drift", desired.to_json()), f"{r.dn} (deleted; {r.upn})"))
        self._queue_txn(txn, rows, report)

    async def _missing(self, oids: list[str], report: ReconcileReport) -> None:
        """Bound users' accounts the listing did not have: gone, or created after it was read."""
        gone: list[str] = []
        for oid in oids:
            await self.rec._keep_lease()
            try:
                await self.rec.client.get_user(oid, ("id",), expect_not_found=True)
            except NotFound:
                gone.append(oid)
        if not gone:
            return

        def run(txn: Txn) -> None:
            entries = [e for oid in gone for e in store.entries_with_value_txn(txn, "o365objectid", oid)[:1]
                       if self.planner.is_bound(e.attrs) and e.attrs.get("o365SyncState") != ["error"]]
            self.rec._report_deleted_txn(txn, entries, report)
        await self.db.run_interaction("full reconcile missing", run)
