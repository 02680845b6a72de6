"""twistd entry point (the wiring of the LDAP process): ``twistd -n ldapsync [--config FILE]`` → the service tree.

The tree is a MultiService: the database first, the LDAP listeners after it
(children stop in reverse order, so listeners close before the database), with
``[ldap] processes`` > 1 the other LDAP processes (``ldap_processes.py``: they
inherit the listeners' sockets and stop before them), the self-service pages,
and with ``[office365] enabled`` the Microsoft 365 worker process last (``worker_process.py``; it builds its own tree from the
connector and worker services in ``services.py`` and stops first).  Here the
directory gets its write hooks: the outbox planner, which wakes the worker
process after COMMIT, and the activation links.  Only the twistd plugin and
the CLI import this module.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application import service
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from ldapsync import logs, metrics
from ldapsync.config import Config, ConfigError, load_config
from ldapsync.filemodes import prepare_sqlite_files, sqlite_path, tighten
from ldapsync.ldap.server import ConnectionLimits, LDAPServerFactory
from ldapsync.ldap_processes import LDAPProcessesService
from ldapsync.listeners import Listener, reuse_port
from ldapsync.selfservice.service import SelfServiceService
from ldapsync.services import (
    DatabaseProbe,
    DirectoryService,
    OrderedMultiService,
    metrics_directory,
    office365_hooks,
    starttls_context,
)
from ldapsync.worker_process import WorkerProcessService

log = Logger()


class Options(usage.Options):
    optParameters = [["config", "c", None, "Configuration file (TOML); default $LDAPSYNC_CONFIG, ./ldapsync.toml or embedded defaults"]]


def _sqlite_dir(config: Config) -> list[str]:
    """SQLite: the database's directory (0700 when new) and file (0600) before anything opens them;
    files others can read are tightened (``ldapsync/filemodes.py``).  Warnings for the caller to show."""
    path = sqlite_path(config.directory.database)
    return prepare_sqlite_files(path) if path is not None else []


def _exposed_secrets(config: Config) -> list[str]:
    """Warnings for secret files others can read (they are the admin's: not changed)."""
    found = [tighten(config.admin.password_file, holds="the admin password", fix=False),
             tighten(config.secrets.key_file, holds="the key of the queued passwords and tokens", fix=False)]
    return [line for line in found if line]


class _Root(OrderedMultiService):
    """The root service; given the application, it hands twistd the log observer (twistd asks the
    application for an ``ILogObserver`` before it starts logging, after makeService)."""

    log_observer: Any = None

    def setServiceParent(self, parent: Any) -> Any:
        if self.log_observer is not None:
            parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)


def make_service(config: Config) -> service.MultiService:
    for line in _sqlite_dir(config) + _exposed_secrets(config):
        log.warn("{line}", line=line)
    if config.metrics.listen:
        # Before anything counts; the Microsoft 365 worker process inherits the directory.
        metrics.enable(metrics_directory(config), fresh=True)
    top = _Root()
    dirsvc = DirectoryService(config)
    dirsvc.setServiceParent(top)
    ctx = starttls_context(config)
    limits = ConnectionLimits(config.ldap.max_connections, config.ldap.max_connections_per_address)
    listeners = []
    for endpoint in config.ldap.listen:
        factory = LDAPServerFactory(dirsvc.directory, config.ldap, starttls_context=ctx,
                                    is_tls_listener=endpoint.startswith("ssl:"), limits=limits,
                                    access=config.log.access)
        listener = Listener(endpoint, factory, "[ldap] listen", reuse_port=config.ldap.processes > 1 and reuse_port())
        listener.setServiceParent(top)
        listeners.append(listener)
    # [ldap] processes > 1: the other LDAP processes, started once this one has bootstrapped the
    # database and bound the sockets they inherit (ldapsync/ldap_processes.py); stopped before
    # this process's listeners close.
    ldap_procs = None
    if config.ldap.processes > 1:
        ldap_procs = LDAPProcessesService(config, listeners, config.ldap.processes)
        ldap_procs.setServiceParent(top)
    # Activation links, the password pages and expiry warnings (after the directory, which
    # they use; children stop in reverse order).
    selfsvc = SelfServiceService(dirsvc.directory)
    selfsvc.setServiceParent(top)
    if config.office365.enabled:
        # The connector, the outbox worker and the reconciler run in a child process
        # (worker_process.py), so their CPU is not taken from LDAP.  Every write that
        # reaches Microsoft 365 plans its outbox rows in its own transaction and wakes the child
        # after COMMIT; a user bound without a password gets an activation link, mailed at once.
        procsvc = WorkerProcessService(dirsvc)
        dirsvc.hooks.extend(office365_hooks(dirsvc.directory, wake=procsvc.wake, links=selfsvc.links))
        if ldap_procs is not None:
            # the other LDAP processes' COMMITs wake the one worker through this process
            ldap_procs.wake = procsvc.wake
            ldap_procs.worker_hungry = lambda: procsvc.hungry
            procsvc.on_hungry.append(ldap_procs.hungry)
        procsvc.setServiceParent(top)
    if config.metrics.listen:
        Listener(config.metrics.listen, metrics.site(DatabaseProbe(dirsvc)), "[metrics] listen").setServiceParent(top)
    return top


def makeService(options: Options) -> service.MultiService:
    try:
        config = load_config(options["config"])
        twistd = getattr(options, "parent", None) or {}
        observer = logs.make_observer(config.log.level, config.log.format,
                                      logs.output(config.log.file, twistd.get("logfile"), bool(twistd.get("nodaemon"))))
        top = make_service(config)
        top.log_observer = observer  # type: ignore[attr-defined]
        return top
    except (ConfigError, OSError) as e:
        sys.stderr.write(f"ldapsync: {e}\n")
        raise SystemExit(2) from None
