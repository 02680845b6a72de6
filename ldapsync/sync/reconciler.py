"""Drift: put the directory's values back on users someone changed in Microsoft 365.

Every ``[office365] reconcile_interval`` (and on ``ldapsync o365 reconcile``)
the reconciler reads what changed in the tenant with ``/users/delta`` (a full
scan the first time, then the persisted delta link) and compares each linked
user with what the directory says.  It does not talk to Graph for writes: a
user that drifted gets an outbox row with the directory's desired state (reason
``drift``), and the worker puts the values back, so ordering, retries and
status stay in one place.

- bound user: names, UPN/mail, mailNickname, accountEnabled=true are the directory's;
- unbound user we disabled, re-enabled by someone in the portal: disabled again;
- deleted user whose account we kept (``o365_account_records``, ``sync/account_records.py``),
  re-enabled in the portal: disabled again (a row for its entryUUID, ``deleted``);
- account deleted in Microsoft 365: reported on the entry (o365SyncState error,
  o365LastError says so), not recreated.

The delta pass sees only what changed since the last one.  Every ``full_reconcile_interval``
(and on ``ldapsync o365 reconcile --full``) :meth:`Reconciler.run_once` with ``full=True`` runs the
full comparison of every bound and ever-bound user instead (``sync/full_reconcile.py``).

With several nodes only one reconciles at a time (``store/reconcile_lease.py``).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field, replace
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.logger import Logger

from ldapsync.directory.errors import LDAPError
from ldapsync.directory.hooks import Origin
from ldapsync.directory.writes import Write, now_generalized
from ldapsync.jsontypes import JSONObject
from ldapsync.store import entries as store
from ldapsync.store.database import Txn
from ldapsync.store.entries import StoredEntry
from ldapsync.store import account_records as records
from ldapsync.store import reconcile_lease as lease
from ldapsync.store.outbox import QueuedRow, queue_covers_txn, notify_txn, queue_rows_txn
from ldapsync.sync import expiry
from ldapsync.sync.account_records import ever_bound, record_desired, user_deleted_txn
from ldapsync.sync.graph_mapping import DRIFT_BLOCK
from ldapsync.sync.planner import DesiredUser, OutboxPlanner
from ldapsync.sync.status import STATUS_OPERATION
from ldapsync.graph.errors import DeltaExpired, NotFound
from ldapsync.sync.connector import write_status_txn

if TYPE_CHECKING:
    from ldapsync.graph.client import GraphClient
    from ldapsync.directory.facade import Directory

log = Logger()

META_DELTA_LINK = "o365.delta_link"
META_RECHECK = "o365.reconcile_recheck"   # object ids a full scan could not judge: looked up next pass
LEASE_SECONDS = 120.0        # renewed every third of it while a pass runs; a node that dies holding
                             # it gives it back when it restarts or the others presume it dead
SELECT = ("id", "userPrincipalName", "mail", "mailNickname", "displayName", "givenName", "surname", "accountEnabled")


@dataclass
class ReconcileReport:
    seen: int = 0
    drifted: list[str] = field(default_factory=list)     # DNs queued
    deleted: list[str] = field(default_factory=list)     # DNs whose account is gone
    full_scan: bool = False
    recheck: list[str] = field(default_factory=list)     # linked while the full scan ran: looked up next pass
    full: bool = False                                   # the full comparison (sync/full_reconcile.py)


def _norm(v: object) -> object:
    """A Graph property's value for comparison (any JSON value; strings case-insensitively)."""
    return v.lower() if isinstance(v, str) else v


def drift(desired: DesiredUser, remote: JSONObject, attrs: dict[str, list[str]] | None = None, *,
          ours: bool = False) -> list[str]:
    """Which properties of the Graph user differ from the directory's wishes (``attrs``: the
    entry, for its o365PasswordPending: an account waiting for its password stays blocked when
    it is ``ours`` — created or blocked by ldapsync, not linked; see sync/account_records.py)."""
    out: list[str] = []
    if not desired.bound:
        if remote.get("accountEnabled") is True:
            out.append("accountEnabled")
        return out
    pairs = {
        "userPrincipalName": desired.upn, "mail": desired.mail, "mailNickname": desired.mail_nickname,
        "displayName": desired.display_name, "givenName": desired.given_name, "surname": desired.surname,
    }
    for k, want in pairs.items():
        if want is not None and k in remote and _norm(remote.get(k)) != _norm(want):
            out.append(k)
    pending = (attrs or {}).get("o365PasswordPending") == ["TRUE"]
    if "accountEnabled" in remote and remote.get("accountEnabled") is False and desired.has_password and not pending:
        out.append("accountEnabled")
    elif remote.get("accountEnabled") is True and pending and ours:
        out.append("accountEnabled")
    return out


def drift_payload(desired: DesiredUser, remote: JSONObject, diffs: list[str]) -> str:
    """The row's payload: the desired state, marked to block when a bound account must be blocked."""
    if desired.bound and "accountEnabled" in diffs and remote.get("accountEnabled") is True:
        desired = replace(desired, reason=DRIFT_BLOCK)
    return desired.to_json()


class Reconciler:
    def __init__(self, directory: "Directory", planner: OutboxPlanner, client: GraphClient, *,
                 wake: Callable[[], None] | None = None, node: str | None = None) -> None:
        """``node``: the worker node this pass runs on (its outbox owner id), so that the node's
        next start, or the nodes that presume it dead, give back a lease it held when it died."""
        self.d = directory
        self.db = directory.db
        self.planner = planner
        self.client = client
        self.wake = wake
        self.node = node
        self.pass_id = uuid.uuid4().hex
        self._until = 0.0
        self._renewed = 0.0

    async def run_once(self, *, full: bool = False, due_after: float | None = None) -> ReconcileReport | None:
        """One pass; None when another node is reconciling (the lease in ``meta`` says so).

        ``full``: the full comparison (``sync/full_reconcile.py``) instead of the delta pass;
        with ``due_after`` (seconds) only when no node has completed one for that long (None too)."""
        # here, not at the top: full_reconcile.py builds on this module (drift, SELECT)
        from ldapsync.sync.full_reconcile import FullComparison, full_due_txn
        if full and due_after is not None and not await self.db.run_interaction(
                "full reconcile due?", full_due_txn, due_after, write=False):
            return None
        if not await self.db.run_interaction("reconcile lease", self._lease_txn, True):
            log.info("reconcile: another node holds the reconcile lease; skipped")
            return None
        if full and due_after is not None and not await self.db.run_interaction(
                "full reconcile due?", full_due_txn, due_after, write=False):
            # another node completed one while this one waited for the lease
            await self.db.run_interaction("reconcile lease", self._lease_txn, False)
            return None
        started = self._renewed = time.monotonic()
        log.info("reconcile: pass started on this node (lease {lease} until {until:.3f})",
                 lease=self.pass_id[:12], until=self._until)
        report: ReconcileReport | None = None
        try:
            report = await (FullComparison(self).run() if full else self._pass())
            return report
        finally:
            await self.db.run_interaction("reconcile lease", self._lease_txn, False)
            log.info("reconcile: pass ended after {elapsed:.3f}s ({seen} user(s) read); lease {lease} given back",
                     elapsed=time.monotonic() - started, seen=report.seen if report else "?", lease=self.pass_id[:12])

    def _lease_txn(self, txn: Txn, take: bool) -> bool:
        """Take (or give back) the one-pass-at-a-time lease (``store/reconcile_lease.py``)."""
        if take:
            now = time.time()
            if not lease.take_txn(txn, self.pass_id, self.node, now, now + LEASE_SECONDS):
                return False
            self._until = now + LEASE_SECONDS
            return True
        lease.give_back_txn(txn, self.pass_id)
        return True

    async def _keep_lease(self) -> None:
        """Renew the lease during a long pass; give up the pass if another node has taken it over."""
        if time.monotonic() - self._renewed < LEASE_SECONDS / 3:
            return
        self._renewed = time.monotonic()
        if not await self.db.run_interaction("reconcile lease", self._renew_txn):
            raise RuntimeError("the reconcile lease expired and another node took it over; pass abandoned")

    def _renew_txn(self, txn: Txn) -> bool:
        until = time.time() + LEASE_SECONDS
        if not lease.renew_txn(txn, self.pass_id, self.node, until):
            return False
        self._until = until
        return True

    async def _pass(self) -> ReconcileReport:
        report = ReconcileReport()
        started = now_generalized()
        link = await self.db.run_interaction("delta link", store.get_meta_txn, META_DELTA_LINK, write=False)
        report.full_scan = not link
        try:
            query = self.client.delta(",".join(SELECT), link or None)
            batch: list[JSONObject] = []
            seen: set[str] = set()
            async for item in query:
                await self._keep_lease()
                if report.full_scan and item.get("id") and "@removed" not in item:
                    seen.add(item["id"].lower())
                batch.append(item)
                if len(batch) >= 500:
                    await self._check(batch, report)
                    batch = []
            await self._check(batch, report)
            new_link = query.delta_link
            await self._recheck()
            if report.full_scan:
                # A full scan lists only users that exist: a linked account missing from it was
                # deleted in Microsoft 365 (perhaps before any delta link could report it).
                await self.db.run_interaction("reconcile missing", self._missing_txn, seen, started, report)
                if report.recheck:
                    await self.db.run_interaction("reconcile recheck", store.set_meta_txn, META_RECHECK,
                                                  json.dumps(report.recheck))
        except DeltaExpired:
            log.info("the Microsoft 365 delta link expired; starting a full scan")
            await self.db.run_interaction("delta reset", store.set_meta_txn, META_DELTA_LINK, "")
            return await self._pass()
        if new_link:
            await self.db.run_interaction("delta link", store.set_meta_txn, META_DELTA_LINK, new_link)
        await self.db.run_interaction("reconciled", self._stamp_txn)
        if report.drifted or report.deleted:
            log.info("reconcile: {n} drifted user(s) queued, {m} deleted in Microsoft 365", n=len(report.drifted), m=len(report.deleted))
        if report.drifted and self.wake is not None:
            self.wake()
        return report

    def _stamp_txn(self, txn: Txn) -> None:
        write_status_txn(self.d, txn, {"o365LastReconcile": [now_generalized()]})

    async def _check(self, items: list[JSONObject], report: ReconcileReport) -> None:
        if not items:
            return
        report.seen += len(items)
        log.debug("reconcile: {n} changed user(s) from Microsoft 365", n=len(items))
        await self.db.run_interaction("reconcile", self._check_txn, items, report)

    def _check_txn(self, txn: Txn, items: list[JSONObject], report: ReconcileReport) -> None:
        rows = []
        deleted = []
        now = time.time()
        for item in items:
            oid = item.get("id")
            if not oid:
                continue
            entries = store.entries_with_value_txn(txn, "o365objectid", oid.lower())
            if not entries:
                rec = records.by_object_id_txn(txn, oid) if "@removed" not in item else None
                if rec is None or not user_deleted_txn(self.d, txn, rec):
                    continue           # not linked to the directory: not ours to correct
                desired = record_desired(self.planner, rec, "drift")     # its entry was deleted
                if drift(desired, item) and not queue_covers_txn(txn, desired.entry_uuid):
                    rows.append(QueuedRow(desired.entry_uuid, now, "drift", desired.to_json()))
                    report.drifted.append(f"{rec.dn} (deleted; {rec.upn})")
                continue
            e = entries[0]
            if "@removed" in item:
                if self.planner.is_bound(e.attrs):
                    deleted.append(e)
                continue
            bound = self.planner.is_bound(e.attrs)
            if bound and expiry.left_to_the_sweep(self.d, e.attrs):
                continue               # its password expired: the sweep blocks it (and guards a mass expiry)
            rec = None
            if not bound or (item.get("accountEnabled") is True and e.attrs.get("o365PasswordPending") == ["TRUE"]):
                rec = records.by_entry_uuid_txn(txn, (e.attrs.get("entryUUID") or [""])[0])
            if not bound and not ever_bound(e.attrs, rec):
                continue               # never bound by us, or imported and not bound: leave it alone
            desired = self.planner.desired(e.attrs, e.dn, bound=bound, reason="drift")
            diffs = drift(desired, item, e.attrs, ours=rec is not None)
            if diffs:
                if queue_covers_txn(txn, desired.entry_uuid):
                    continue           # already queued: the worker will converge it
                rows.append(QueuedRow(desired.entry_uuid, now, "drift", drift_payload(desired, item, diffs)))
                report.drifted.append(e.dn)
        if rows:
            queue_rows_txn(txn, rows)
            notify_txn(txn)
        self._report_deleted_txn(txn, deleted, report)

    def _missing_txn(self, txn: Txn, seen: set[str], started: str, report: ReconcileReport) -> None:
        gone = []
        ids = [r[0] for r in txn.rows("SELECT entry_id FROM entry_index WHERE attr = ?", ("o365objectid",))]
        for e in store.get_entries_by_id_txn(txn, ids):
            oid = (e.attrs.get("o365ObjectId") or [""])[0].lower()
            if not oid or oid in seen or not self.planner.is_bound(e.attrs) or e.attrs.get("o365SyncState") == ["error"]:
                continue
            if (e.attrs.get("o365SyncedAt") or [""])[0] >= started:
                # Linked while the scan ran (to the second): the scan may simply not list it yet,
                # or it was deleted before the scan got there, and the delta link, issued after,
                # will never say so.  Looked up by id in the next pass.
                report.recheck.append(oid)
                continue
            gone.append(e)
        self._report_deleted_txn(txn, gone, report)

    async def _recheck(self) -> None:
        """Look up the accounts the last full scan could not judge; report those that are gone."""
        raw = await self.db.run_interaction("reconcile recheck", store.get_meta_txn, META_RECHECK, write=False)
        if not raw:
            return
        gone: list[str] = []
        for oid in json.loads(raw):
            try:
                await self.client.get(f"/users/{oid}", {"$select": "id"}, expect_not_found=True)
            except NotFound:
                gone.append(oid)

        def run(txn: Txn) -> None:
            entries = [e for oid in gone for e in store.entries_with_value_txn(txn, "o365objectid", oid)[:1]
                       if self.planner.is_bound(e.attrs) and e.attrs.get("o365SyncState") != ["error"]]
            self._report_deleted_txn(txn, entries, ReconcileReport())
            store.set_meta_txn(txn, META_RECHECK, "")
        await self.db.run_interaction("reconcile recheck", run)

    def _report_deleted_txn(self, txn: Txn, gone: list[StoredEntry], report: ReconcileReport) -> None:
        if not gone:
            return
        w = Write(self.d, txn, str(self.d.admin_dn), STATUS_OPERATION, Origin.SYNC_STATUS)
        for e in gone:
            try:
                st = w.track(e)
            except LDAPError:           # deleted from the directory meanwhile: nothing to report on
                continue
            w.set_operational(st, {
                "o365SyncState": ["error"],
                "o365LastError": ["the account was deleted in Microsoft 365; it is not recreated automatically "
                                  "(unbind and bind the user again to create a new account)"],
            })
            report.deleted.append(e.dn)
        w.finish()
