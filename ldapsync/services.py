"""The Twisted services every process is built from, and the write hooks a process hands its directory.

Owns the pieces the wiring assembles: the server process's tree (``tap.py: make_service``), an
extra LDAP process's (``ldap_processes.py: build``), the Microsoft 365 worker process's
(``worker_process.py: build``) and the CLI (``cli/``) take them from here.  This is the lowest
floor of the wiring: it imports none of those, and nothing below it imports it.

::

    LDAP process (tap.make_service)          worker process (worker_process.build)
      DirectoryService  (db, directory, hooks)  DirectoryService(bootstrap=False), no hooks
      Listener × [ldap] listen                  ConnectorService
      LDAPProcessesService ([ldap] processes)   OutboxWorkerService (worker, LISTEN, reconcile)
      SelfServiceService (selfservice/)
      WorkerProcessService (worker_process.py)
      Listener [metrics] listen (DatabaseProbe)
      hooks = office365_hooks(...)  ([office365] enabled)
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, ssl
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ldapsync import metrics
from ldapsync.clock import Timer
from ldapsync.config import Config
from ldapsync.directory.facade import Directory
from ldapsync.directory.hooks import WriteHooks
from ldapsync.filemodes import sqlite_path
from ldapsync.graph.errors import redact
from ldapsync.selfservice.links import ActivationHook, LinkService
from ldapsync.mail import Mailer
from ldapsync.store import stats
from ldapsync.store.database import Database
from ldapsync.sync.connector import Connector, ConnectorState, read_status_txn
from ldapsync.sync.expiry import ExpirySweep
from ldapsync.sync.notify import OutboxListener
from ldapsync.sync.planner import OutboxPlanner
from ldapsync.sync.reconciler import Reconciler
from ldapsync.sync.worker import OutboxWorker

log = Logger()


def office365_hooks(directory: Directory, *, wake: Callable[[], None] | None = None,
                    links: LinkService | None = None) -> list[WriteHooks]:
    """The write hooks of a process whose writes propagate to Microsoft 365, in the order they run:
    the outbox planner (rows in the write's transaction, ``wake`` after COMMIT), then the
    activation links (``links``: the server's, which mails right after COMMIT; by default one
    without a mailer, whose links the server's poll sends)."""
    planner = OutboxPlanner.from_config(directory, wake)
    return [planner, ActivationHook(links or LinkService(directory, None), planner)]


def starttls_context(config: Config) -> Any:
    """The TLS context of STARTTLS (``[ldap] starttls_cert``/``starttls_key``), or None."""
    if not config.ldap.starttls_cert:
        return None
    with open(config.ldap.starttls_cert, "rb") as f:
        cert = f.read()
    with open(config.ldap.starttls_key, "rb") as f:
        key = f.read()
    return ssl.PrivateCertificate.loadPEM(cert + b"\n" + key).options()


class DirectoryService(service.Service):
    """Owns the database, the directory and the directory's write hooks; bootstraps the tree at
    start (the LDAP server; the Microsoft 365 worker process, which opens the same database, does
    not).  ``hooks`` is the list the directory runs (``ldapsync/directory/hooks.py``): the wiring
    fills it (:func:`office365_hooks`) before the service starts."""

    def __init__(self, config: Config, *, bootstrap: bool = True) -> None:
        self.config = config
        self.bootstrap = bootstrap
        self.db = Database(config.directory.database, durability=config.directory.durability)
        self.hooks: list[WriteHooks] = []
        self.directory = Directory(config, self.db, hooks=self.hooks)

    def privilegedStartService(self) -> None:
        # Runs before the listeners bind their ports (they come after us in
        # the tree), so no client ever sees a half-initialised directory.
        super().privilegedStartService()
        self.db.start()
        self.directory.start()
        if self.bootstrap:
            generated_before = not Path(self.config.admin.password_file).exists()
            for line in self.directory.bootstrap_sync():
                log.info("{line}", line=line)
            if generated_before:
                log.info("the admin DN is {dn}; its password is in {path}", dn=self.config.admin_dn,
                         path=self.config.admin.password_file)
        # What start-up built (modules, the schema, the config) lives as long as the process: out
        # of the cycle collector's sight, so that a full collection scans only what the server
        # made since (measured: 50 ms pauses of every LDAP operation → see tests/perf/README.md).
        gc.freeze()

    def stopService(self) -> Any:
        super().stopService()
        self.directory.stop()
        self.db.stop()


class ConnectorService(service.Service):
    """The Microsoft 365 connector (only when ``[office365] enabled``); failures never stop LDAP.
    Part of the worker process's tree (``worker_process.py: build``), not the LDAP server's."""

    def __init__(self, config: Config, dirsvc: DirectoryService) -> None:
        self.config = config
        self.dirsvc = dirsvc
        self.connector: Any = None

    def startService(self) -> None:
        from twisted.internet import reactor

        super().startService()
        mailer = None
        if self.config.mail.admin_address:
            mailer = Mailer(self.config.mail)
        self.connector = Connector(self.dirsvc.directory, reactor=reactor, mailer=mailer)
        d = defer.ensureDeferred(self.connector.start())
        d.addErrback(lambda f: log.failure("Microsoft 365 connector failed to start", f))

    def stopService(self) -> Any:
        super().stopService()
        if self.connector is not None:
            self.connector.stop()


class OutboxWorkerService(service.Service):
    """Drains the Microsoft 365 outbox (``ldapsync/sync/worker.py``) and runs the reconcile loop.
    Part of the worker process's tree (``worker_process.py: build``): woken by the LDAP
    process's planner after COMMIT through the process's stdin, by NOTIFY on PostgreSQL.  Its
    planner only serves the reconciler and the password expiry sweep (what the directory wants of each user): the worker
    process makes no write that reaches Microsoft 365, so its directory has no write hooks."""

    def __init__(self, dirsvc: DirectoryService, connsvc: ConnectorService) -> None:
        self.dirsvc = dirsvc
        self.connsvc = connsvc
        self.worker: Any = None
        self.planner = OutboxPlanner.from_config(dirsvc.directory)

    def startService(self) -> None:
        from twisted.internet import reactor

        super().startService()
        self.worker = OutboxWorker(self.dirsvc.directory, self.connsvc.connector, reactor=reactor,
                                   lease_seconds=self.dirsvc.config.office365.outbox_lease,
                                   node_timeout=self.dirsvc.config.office365.node_timeout)
        d = defer.ensureDeferred(self.worker.start())
        d.addErrback(lambda f: log.failure("Microsoft 365 outbox worker failed to start", f))
        # PostgreSQL (several nodes): rows committed by any node wake this worker (sync/notify.py).
        self.listener: Any = None
        if self.dirsvc.db.is_postgres:
            self.listener = OutboxListener.for_database(self.dirsvc.db, self.worker.wake, reactor=reactor)
            self.listener.start()
        # Drift: every reconcile_interval, once the connector is active.
        self.reconcile_loop = LoopingCall(self._reconcile)
        self.reconcile_loop.clock = reactor
        self.reconcile_loop.start(self.dirsvc.config.office365.reconcile_interval, now=False)
        # The full comparison (sync/full_reconcile.py): looks every min(interval, 60 s) whether a
        # pass is due (the last one, by any node, is in meta), so one runs per interval in a cluster.
        self.full_loop: Any = None
        full = self.dirsvc.config.office365.full_reconcile_interval
        if full > 0:
            self.full_loop = LoopingCall(self._reconcile, full)
            self.full_loop.clock = reactor
            self.full_loop.start(min(full, 60.0), now=False)
        # Expired directory passwords block Microsoft 365 sign-in (sync/expiry.py): time alone
        # makes a password expire, so a sweep queues those disables, as often as the reconcile.
        self.expiry_loop = LoopingCall(self._expiry_sweep)
        self.expiry_loop.clock = reactor
        self.expiry_loop.start(self.dirsvc.config.office365.reconcile_interval, now=False)

    def _expiry_sweep(self) -> Any:
        sweep = ExpirySweep(self.dirsvc.directory, self.planner, wake=self.worker.wake if self.worker else None)
        d = defer.ensureDeferred(sweep.run_once())
        d.addErrback(lambda f: log.failure("password expiry sweep failed", f))
        return d

    def _reconcile(self, full_interval: float | None = None) -> Any:
        conn = self.connsvc.connector
        if conn is None or conn.client is None or conn.state != ConnectorState.active:
            return None
        rec = Reconciler(self.dirsvc.directory, self.planner, conn.client, wake=self.worker.wake if self.worker else None,
                         node=self.worker.owner if self.worker else None)
        d = defer.ensureDeferred(rec.run_once(full=full_interval is not None, due_after=full_interval))
        d.addErrback(lambda f: log.failure("reconcile pass failed", f))
        return d

    def stopService(self) -> Any:
        super().stopService()
        for loop in (getattr(self, "reconcile_loop", None), getattr(self, "full_loop", None),
                     getattr(self, "expiry_loop", None)):
            if loop is not None and loop.running:
                loop.stop()
        waits = []
        if self.worker is not None:
            # deliveries in flight finish, then this node's leases are given back (needs the database)
            waits.append(self.worker.stop())
        if getattr(self, "listener", None) is not None:
            waits.append(defer.maybeDeferred(self.listener.stop))
        return defer.gatherResults(waits, consumeErrors=True) if waits else None


class OrderedMultiService(service.MultiService):
    """Children stop one after another, last started first, each once the previous one's
    stopService Deferred has fired (twisted's MultiService stops them all at once): the outbox
    worker gives its leases back before the database it needs is stopped."""

    def stopService(self) -> Any:
        service.Service.stopService(self)

        async def run() -> None:
            for svc in reversed(list(self)):
                try:
                    await defer.maybeDeferred(svc.stopService)
                except Exception:  # noqa: BLE001 - one child's failure must not keep the others running
                    log.failure("stopping {svc} failed", svc=svc)
        return defer.ensureDeferred(run())


def metrics_directory(config: Config) -> Path:
    """Where this node's processes keep their metrics files: ``metrics/`` next to the SQLite
    database, else ``var/metrics`` under the working directory (the node's state directory; not
    next to the ``[secrets]`` key, which several nodes may share)."""
    db = sqlite_path(config.directory.database)
    return (db.parent if db is not None else Path("var")) / "metrics"


class DatabaseProbe:
    """What ``/metrics`` and ``/readyz`` read from the database at each request (``metrics.site``):
    the queue, the connector's state and the bound users by sync state (a scan: cached for
    ``users_ttl`` seconds).  A database that does not answer gives ``database_ok=False``."""

    def __init__(self, dirsvc: DirectoryService, users_ttl: float = 10.0,
                 monotonic: Timer = time.monotonic) -> None:
        self.dirsvc = dirsvc
        self.users_ttl = users_ttl
        self.monotonic = monotonic
        self._users: dict[str, int] = {}
        self._users_at: float | None = None

    async def __call__(self) -> metrics.Probe:
        now = self.monotonic()
        stale = self._users_at is None or now - self._users_at >= self.users_ttl
        try:
            queue, state, users = await self.dirsvc.db.run_interaction("metrics: probe", self._read_txn, stale,
                                                                      write=False)
        except Exception as e:  # noqa: BLE001 - any database failure means "not ready", said in one line
            return metrics.Probe(database_ok=False, database_error=_short(e))
        if users is not None:
            self._users, self._users_at = users, now
        return metrics.Probe(database_ok=True, connector_state=state, queue_rows=dict(queue.rows_by_state),
                             oldest_change_age=queue.oldest_created_at, users_by_state=dict(self._users))

    def _read_txn(self, txn: Any, with_users: bool) -> tuple[Any, str, dict[str, int] | None]:
        """One read transaction: the queue, the connector's state and (``with_users``) the users."""
        queue = stats.queue_stats_txn(txn)
        state = "off"
        if self.dirsvc.config.office365.enabled:
            st = read_status_txn(self.dirsvc.directory, txn)
            state = next(iter(st.get("o365ConnectorState") or ()), "not started")
        return queue, state, stats.users_by_sync_state_txn(txn) if with_users else None


def _short(e: BaseException) -> str:
    """One line for /readyz: the error's class and its first line, without connection details."""
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return redact(f"{type(e).__name__}: {first}" if first else type(e).__name__)
