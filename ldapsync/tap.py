"""twistd entry point: ``twistd -n ldapsync [--config FILE]`` → the service tree.

The tree is a MultiService: the database first, the LDAP listeners after it
(children stop in reverse order, so listeners close before the database), the
self-service pages, and with ``[office365] enabled`` the Microsoft 365 worker
process last (``sync/worker_process.py``; it builds its own tree from the
connector and worker services below and stops first).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.error import CannotListenError
from twisted.internet import ssl
from twisted.logger import Logger
from twisted.python import usage

from ldapsync.config import Config, ConfigError, load_config

log = Logger()


class Listener(StreamServerEndpointService):
    """A listening port whose failure to listen stops the server with one clear line, not a traceback."""

    def __init__(self, description: str, factory: Any, config_key: str) -> None:
        from twisted.internet import endpoints, reactor

        super().__init__(endpoints.serverFromString(reactor, description), factory)
        self._raiseSynchronously = True
        self.description = description
        self.config_key = config_key

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            sys.stderr.write(f"ldapsync: cannot listen on {self.description!r} ({self.config_key}): {reason}; "
                             "is another server using that port?\n")
            sys.stderr.flush()
            # The database's thread pools are already running (they are not daemon threads), so
            # SystemExit would leave a half-started process behind: end it here.  Nothing is lost:
            # every transaction so far has committed.
            os._exit(1)


class Options(usage.Options):
    optParameters = [["config", "c", None, "Configuration file (TOML); default $LDAPSYNC_CONFIG, ./ldapsync.toml or embedded defaults"]]


class DirectoryService(service.Service):
    """Owns the database and the directory; bootstraps the tree at start (the LDAP server; the
    Microsoft 365 worker process, which opens the same database, does not)."""

    def __init__(self, config: Config, *, bootstrap: bool = True) -> None:
        from ldapsync.directory.service import Directory
        from ldapsync.store.database import Database

        self.config = config
        self.bootstrap = bootstrap
        self.db = Database(config.directory.database, durability=config.directory.durability)
        self.directory = Directory(config, self.db)
        self.planner = None
        if config.office365.enabled:
            from ldapsync.sync.outbox import install_planner

            self.planner = install_planner(self.directory)

    def privilegedStartService(self) -> None:
        # Runs before the listeners bind their ports (they come after us in
        # the tree), so no client ever sees a half-initialised directory.
        super().privilegedStartService()
        self.db.start()
        self.directory.start()
        if not self.bootstrap:
            return
        generated_before = not _exists(self.config.admin.password_file)
        for line in self.directory.bootstrap_sync():
            log.info("{line}", line=line)
        if generated_before:
            log.info("the admin DN is {dn}; its password is in {path}", dn=self.config.admin_dn, path=self.config.admin.password_file)

    def stopService(self) -> Any:
        super().stopService()
        self.directory.stop()
        self.db.stop()


def _exists(path: str) -> bool:
    from pathlib import Path

    return Path(path).exists()


def _sqlite_dir(config: Config) -> list[str]:
    """SQLite: the database's directory (0700 when new) and file (0600) before anything opens them;
    files others can read are tightened (``ldapsync/filemodes.py``).  Warnings for the caller to show."""
    from ldapsync.filemodes import prepare_sqlite_files, sqlite_path

    path = sqlite_path(config.directory.database)
    return prepare_sqlite_files(path) if path is not None else []


def _exposed_secrets(config: Config) -> list[str]:
    """Warnings for secret files others can read (they are the admin's: not changed)."""
    from ldapsync.filemodes import tighten

    found = [tighten(config.admin.password_file, holds="the admin password", fix=False),
             tighten(config.secrets.key_file, holds="the key of the queued passwords and tokens", fix=False)]
    return [line for line in found if line]


def starttls_context(config: Config) -> Any:
    if not config.ldap.starttls_cert:
        return None
    with open(config.ldap.starttls_cert, "rb") as f:
        cert = f.read()
    with open(config.ldap.starttls_key, "rb") as f:
        key = f.read()
    return ssl.PrivateCertificate.loadPEM(cert + b"\n" + key).options()


class ConnectorService(service.Service):
    """The Microsoft 365 connector (only when ``[office365] enabled``); failures never stop LDAP.
    Part of the worker process's tree (``sync/worker_process.py: build``), not the LDAP server's."""

    def __init__(self, config: Config, dirsvc: DirectoryService) -> None:
        self.config = config
        self.dirsvc = dirsvc
        self.connector: Any = None

    def startService(self) -> None:
        from twisted.internet import defer, reactor

        from ldapsync.sync.connector import Connector

        super().startService()
        mailer = None
        if self.config.mail.admin_address:
            from ldapsync.selfservice.mailer import Mailer

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
    Part of the worker process's tree (``sync/worker_process.py: build``): woken by the LDAP
    process's planner after COMMIT through the process's stdin, by NOTIFY on PostgreSQL."""

    def __init__(self, dirsvc: DirectoryService, connsvc: ConnectorService) -> None:
        self.dirsvc = dirsvc
        self.connsvc = connsvc
        self.worker: Any = None

    def startService(self) -> None:
        from twisted.internet import defer, reactor

        from ldapsync.sync.worker import OutboxWorker

        super().startService()
        self.worker = OutboxWorker(self.dirsvc.directory, self.connsvc.connector, reactor=reactor,
                                   lease_seconds=self.dirsvc.config.office365.outbox_lease)
        if self.dirsvc.planner is not None:
            self.dirsvc.planner.wake = self.worker.wake
        d = defer.ensureDeferred(self.worker.start())
        d.addErrback(lambda f: log.failure("Microsoft 365 outbox worker failed to start", f))
        # PostgreSQL (several nodes): rows committed by any node wake this worker (sync/notify.py).
        self.listener: Any = None
        if self.dirsvc.db.is_postgres:
            from ldapsync.sync.notify import OutboxListener

            self.listener = OutboxListener.for_database(self.dirsvc.db, self.worker.wake, reactor=reactor)
            self.listener.start()
        # Drift: every reconcile_interval, once the connector is active.
        from twisted.internet.task import LoopingCall

        self.reconcile_loop = LoopingCall(self._reconcile)
        self.reconcile_loop.clock = reactor
        self.reconcile_loop.start(self.dirsvc.config.office365.reconcile_interval, now=False)

    def _reconcile(self) -> Any:
        from twisted.internet import defer

        from ldapsync.sync.connector import ConnectorState
        from ldapsync.sync.reconciler import Reconciler

        conn = self.connsvc.connector
        planner = self.dirsvc.planner
        if conn is None or conn.client is None or planner is None or conn.state != ConnectorState.active:
            return None
        rec = Reconciler(self.dirsvc.directory, planner, conn.client, wake=self.worker.wake if self.worker else None)
        d = defer.ensureDeferred(rec.run_once())
        d.addErrback(lambda f: log.failure("reconcile pass failed", f))
        return d

    def stopService(self) -> Any:
        super().stopService()
        if getattr(self, "reconcile_loop", None) is not None and self.reconcile_loop.running:
            self.reconcile_loop.stop()
        from twisted.internet import defer

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
        from twisted.internet import defer

        service.Service.stopService(self)

        async def run() -> None:
            for svc in reversed(list(self)):
                try:
                    await defer.maybeDeferred(svc.stopService)
                except Exception:  # noqa: BLE001 - one child's failure must not keep the others running
                    log.failure("stopping {svc} failed", svc=svc)
        return defer.ensureDeferred(run())


def make_service(config: Config) -> service.MultiService:
    from ldapsync.ldap.server import ConnectionLimits, LDAPServerFactory

    for line in _sqlite_dir(config) + _exposed_secrets(config):
        log.warn("{line}", line=line)
    top = OrderedMultiService()
    dirsvc = DirectoryService(config)
    dirsvc.setServiceParent(top)
    ctx = starttls_context(config)
    limits = ConnectionLimits(config.ldap.max_connections, config.ldap.max_connections_per_address)
    for endpoint in config.ldap.listen:
        factory = LDAPServerFactory(
            dirsvc.directory,
            max_pdu_size=config.ldap.max_pdu_size,
            starttls_context=ctx,
            is_tls_listener=endpoint.startswith("ssl:"),
            idle_timeout=config.ldap.idle_timeout,
            max_pdu_size_anonymous=config.ldap.max_pdu_size_anonymous,
            limits=limits,
            max_pending=config.ldap.max_pending,
            max_pending_anonymous=config.ldap.max_pending_anonymous,
        )
        Listener(endpoint, factory, "[ldap] listen").setServiceParent(top)
    # Activation links, the password pages and expiry warnings (after the directory, which
    # they use; children stop in reverse order).
    from ldapsync.selfservice.service import SelfServiceService

    SelfServiceService(dirsvc.directory, dirsvc.planner).setServiceParent(top)
    if config.office365.enabled:
        # The connector, the outbox worker and the reconciler run in a child process
        # (sync/worker_process.py), so their CPU is not taken from LDAP; this process wakes it
        # after COMMIT.
        from ldapsync.sync.worker_process import WorkerProcessService

        WorkerProcessService(dirsvc).setServiceParent(top)
    return top


def makeService(options: Options) -> service.MultiService:
    try:
        config = load_config(options["config"])
        return make_service(config)
    except (ConfigError, OSError) as e:
        sys.stderr.write(f"ldapsync: {e}\n")
        raise SystemExit(2) from None
