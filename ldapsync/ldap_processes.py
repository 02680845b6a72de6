"""More LDAP processes for more cores: ``[ldap] processes = N`` (default: the CPUs this process may use).

Owns the extra LDAP processes' lifecycle (start, restart after a crash, stop) on the server's
side and their entry point.  Python runs one thread at a time, so one process answers LDAP with
one core at most; N processes answer with up to N.  With ``processes = 1`` nothing here runs.

::

    server process (twistd: tap.make_service)              LDAP process k = 1 .. N-1
      config, bootstrap, migrations, admin password file     (python -m ldapsync.ldap_processes)
      binds every [ldap] listen socket, and one more per ─▶ fd 3, 4, ...: listens on them once it
      listener and child (Linux: SO_REUSEPORT) ────────────   can answer (the kernel spreads new
      answers LDAP on its own                                 connections over the listening ones)
      self-service pages, [metrics] listen, pidfile, log
      the one Microsoft 365 worker process                    DirectoryService(bootstrap=False)
      log ◀──────── one JSON line per log event on stdout ─── (tagged "ldap-k" in the server's log)
      worker wake ◀─ "w" line on stdout (only when told "h") ─ COMMIT that queued outbox rows
      the config, one JSON line on stdin ─────────────────▶ (the server's, not the file's: never read)
      "h" on stdin ─▶ (the worker is caught up: say "w" at your next COMMIT)
      stop: "q" on stdin ─▶ graceful stop, exit 0 (SIGKILL after ``stop_timeout``)
      a process that ends unexpectedly ─▶ logged, started again after a capped backoff
      server killed (kill -9) ─▶ SIGKILL at once (Linux PR_SET_PDEATHSIG; elsewhere stdin EOF)

What is per process and what is shared (docs/configuration.md, ``[ldap] processes``): the
database (lockout and failure counts, entries, the outbox) is shared; SQLite takes one writer
at a time across processes (``BEGIN IMMEDIATE`` that waits, ``store/database.py``), readers run in
parallel (WAL).  In memory, per process: the wrong-password limit per client address
(``bind_failures_per_address``), the connection caps (``max_connections``,
``max_connections_per_address``) and paged-search cookies (per connection anyway).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.error import ProcessExitedAlready
from twisted.logger import FilteringLogObserver, Logger, LogLevel, LogLevelFilterPredicate, globalLogBeginner
from twisted.protocols.tls import TLSMemoryBIOFactory

from ldapsync import metrics
from ldapsync.child_processes import QUIT, JSONLines, LineChildProtocol, die_with_parent, read_commands
from ldapsync.config import from_json, to_json
from ldapsync.ldap.server import ConnectionLimits, LDAPServerFactory
from ldapsync.listeners import socket_for_child
from ldapsync.logs import ACCESS, LEVELS
from ldapsync.services import DirectoryService, OrderedMultiService, office365_hooks, starttls_context

log = Logger(namespace="ldapsync.ldap_processes")   # not "__main__" in the child

WAKE = b"w"            # child → server, a line of its own: a COMMIT queued outbox rows
HUNGRY = b"h"          # server → child: the worker is caught up, say "w" at your next such COMMIT
FIRST_FD = 3           # the listening sockets, in [ldap] listen order


# -- the server's side ----------------------------------------------------------------------------

class _ChildProtocol(LineChildProtocol):
    def __init__(self, owner: LDAPProcessesService, index: int) -> None:
        super().__init__(owner)
        self.index = index

    def control(self, line: bytes) -> bool:
        if line == WAKE:
            self.owner._child_wake()
            return True
        return False

    def system(self) -> str:
        return f"ldap-{self.index}"

    def raw(self, line: bytes) -> None:
        log.error("LDAP process {index}: {log_child_text}", index=self.index,
                  log_child_text=line.decode("utf-8", "replace").rstrip())


class LDAPProcessesService(service.Service):
    """Starts ``count`` LDAP processes once the server's listeners are bound (they inherit the
    sockets), restarts one that ends unexpectedly, stops them all when the server stops.

    ``listeners``: the server's :class:`~ldapsync.listeners.Listener` services, in ``[ldap] listen``
    order; ``wake``: the worker process's wake (``[office365] enabled``), called when a child's
    COMMIT queued rows; :meth:`hungry` is what the worker process calls when it is caught up."""

    restart_backoff = (1.0, 30.0)
    stop_timeout = 15.0

    def __init__(self, config: Any, listeners: list[Any], count: int, argv: list[str] | None = None) -> None:
        self.config = config
        self.listeners = listeners
        self.count = count
        self.argv = argv or [sys.executable, "-m", "ldapsync.ldap_processes"]
        self.wake: Callable[[], None] | None = None
        self.worker_hungry: Callable[[], bool] = lambda: False
        self.children: dict[int, _ChildProtocol] = {}
        self._stdin: dict[int, int] = {}
        self._stopping = False
        self._backoff: dict[int, float] = {}
        self._started_at: dict[int, float] = {}
        self._restart_calls: dict[int, Any] = {}
        self._sockets: dict[int, list[int]] = {}
        self._config_line = to_json(config).encode() + b"\n"

    def privilegedStartService(self) -> None:
        # The children's sockets, bound now (as root, when twistd starts as root and drops to
        # --uid later): after the server's, which this follows in the tree.
        super().privilegedStartService()
        self._sockets = {index: [socket_for_child(lst) for lst in self.listeners] for index in range(1, self.count)}

    def startService(self) -> None:
        from twisted.internet import reactor

        super().startService()
        self.reactor: Any = reactor
        self._stopping = False
        for index in range(1, self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._restart_calls.pop(index, None)
        proto = _ChildProtocol(self, index)
        argv = [*self.argv, "--index", str(index)]
        env = dict(os.environ)
        env["LDAPSYNC_PARENT_PID"] = str(os.getpid())
        sockets = self._sockets.pop(index, None) or [socket_for_child(lst) for lst in self.listeners]
        fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        fds.update({FIRST_FD + i: fd for i, fd in enumerate(sockets)})
        try:
            process = self.reactor.spawnProcess(proto, argv[0], argv, env=env, path=os.getcwd(), childFDs=fds)
        finally:
            for fd in sockets:         # the child's now: when it ends, its socket closes with it
                os.close(fd)
        self.children[index] = proto
        self._stdin[index] = process.pipes[0].fileno()
        # First on its stdin: the server's configuration, as the server runs with it (the file may
        # have changed since; the child never reads it), then "h" and "q" bytes.
        try:
            _write_all(self._stdin[index], self._config_line)
        except OSError:
            pass                           # it ended at once: processEnded logs it and starts another
        self._started_at[index] = self.reactor.seconds()
        log.info("LDAP process {index} started (pid {pid})", index=index, pid=process.pid)
        if self.worker_hungry():
            self._tell(index, HUNGRY)      # its COMMITs must wake the worker from the first one

    # -- the worker's wake, across processes
    def _child_wake(self) -> None:
        if self.wake is not None:
            self.wake()

    def hungry(self) -> None:
        """The worker process is caught up: each child says "w" at its next COMMIT that queues rows
        (or at once when it had one since its last "w")."""
        for index in list(self._stdin):
            self._tell(index, HUNGRY)

    def _tell(self, index: int, what: bytes) -> None:
        fd = self._stdin.get(index)
        if fd is None:
            return
        try:
            os.write(fd, what)
        except BlockingIOError:
            pass                     # its pipe is full of unread bytes: it has yet to read this news
        except OSError:
            self._stdin.pop(index, None)

    # -- ends and restarts
    def _ended(self, proto: _ChildProtocol, code: int | None, sig: int | None) -> None:
        index = proto.index
        if self.children.get(index) is not proto:
            return
        del self.children[index]
        self._stdin.pop(index, None)
        if self._stopping:
            return
        how = f"signal {sig}" if sig else f"exit code {code}"
        if sig == signal.SIGTERM:
            # a service manager stopping the whole group reaches a child first (here, before the
            # server's own stop has begun): the restart below is cancelled when the stop comes
            how += ", stopped from outside"
        backoff = self._backoff.get(index, self.restart_backoff[0])
        if self.reactor.seconds() - self._started_at.get(index, 0.0) > 60:
            backoff = self.restart_backoff[0]            # it had been running fine: not a crash loop
        self._backoff[index] = min(backoff * 2, self.restart_backoff[1])
        log.error("LDAP process {index} (pid {pid}) ended unexpectedly ({how}); its connections were closed; "
                  "starting it again in {wait:g}s (the other processes go on answering)",
                  index=index, pid=proto.child_pid, how=how, wait=backoff)
        self._restart_calls[index] = self.reactor.callLater(backoff, self._spawn, index)

    def stopService(self) -> Any:
        super().stopService()
        self._stopping = True
        for call in self._restart_calls.values():
            if call.active():
                call.cancel()
        self._restart_calls.clear()
        waits = []
        for index, proto in list(self.children.items()):
            self._stdin.pop(index, None)
            transport: Any = proto.transport
            with contextlib.suppress(Exception):      # it may be gone already: processEnded follows
                transport.write(QUIT)
                transport.closeStdin()

            def too_slow(transport: Any = transport, index: int = index) -> None:
                log.warn("LDAP process {index} did not stop in {s:g}s; killing it", index=index, s=self.stop_timeout)
                with contextlib.suppress(ProcessExitedAlready, OSError):
                    transport.signalProcess("KILL")
            call = self.reactor.callLater(self.stop_timeout, too_slow)

            def done(result: Any, call: Any = call) -> None:
                if call.active():
                    call.cancel()
            waits.append(proto.ended.addBoth(done))
        return defer.gatherResults(waits, consumeErrors=True) if waits else None


def _write_all(fd: int, data: bytes) -> None:
    """All of ``data`` into a fresh non-blocking pipe (a config is a few KiB; a pipe holds 64)."""
    view = memoryview(data)
    for _ in range(1000):
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            time.sleep(0.001)
        if not view:
            return
    raise OSError("the LDAP process does not read its configuration")


# -- the child ------------------------------------------------------------------------------------

class _Wake:
    """A child's side of the worker's wake: "w" to the server at a COMMIT that queued rows, only
    when the server said "h" (the worker is caught up) since the last "w"; a COMMIT before the
    "h" arrived (the worker's claim may have missed it) is told when it does."""

    def __init__(self, say: Callable[[], None]) -> None:
        self.say = say
        self.hungry = False
        self.dirty = False
        self.lock = threading.Lock()

    def __call__(self) -> None:
        with self.lock:
            send, self.dirty = self.hungry, not self.hungry
            self.hungry = False
        if send:
            self.say()

    def on_hungry(self) -> None:
        with self.lock:
            send = self.dirty
            self.dirty, self.hungry = False, not send
        if send:
            self.say()


def _read_config() -> tuple[Any, bytes]:
    """The server's configuration, the first line on stdin, and what came after it."""
    buf = b""
    while b"\n" not in buf:
        data = os.read(0, 65536)
        if not data:
            os._exit(1)                              # the server died before it said anything
        buf += data
    line, rest = buf.split(b"\n", 1)
    return from_json(line.decode()), rest


def _adopt(reactor: Any, fd: int, description: str, factory: Any) -> Any:
    """Listen on an inherited socket, with TLS when the listener is ``ssl:`` (its certificate and
    key read from the description, as the server did)."""
    endpoint: Any = endpoints.serverFromString(reactor, description)
    sock = socket.socket(fileno=os.dup(fd))
    family = sock.family
    # Listening from now on (the server bound it only; a shared socket listens already: this
    # changes nothing there).
    sock.listen(getattr(endpoint, "_backlog", 50))
    sock.close()
    tls = getattr(endpoint, "_sslContextFactory", None)
    if tls is not None:
        factory = TLSMemoryBIOFactory(tls, False, factory)
    port = reactor.adoptStreamPort(fd, family, factory)
    os.close(fd)                   # the port holds a duplicate
    return port


def build(config: Any, wake: Callable[[], None] | None) -> tuple[service.MultiService, Any]:
    """A child's tree: database and directory (no bootstrap), write hooks (``[office365] enabled``:
    the planner with ``wake``, activation links mailed by the server's poll), no listeners yet."""
    top = OrderedMultiService()
    dirsvc = DirectoryService(config, bootstrap=False)
    dirsvc.setServiceParent(top)
    if config.office365.enabled:
        dirsvc.hooks.extend(office365_hooks(dirsvc.directory, wake=wake))
    return top, dirsvc


def main(argv: list[str] | None = None) -> None:
    from twisted.internet import reactor as _reactor

    ap = argparse.ArgumentParser(description="one of ldapsync's LDAP processes (started by the server)")
    ap.add_argument("--index", type=int, required=True)
    args = ap.parse_args(argv)
    die_with_parent()
    metrics.enable_from_environment()
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # Ctrl-C reaches the server, which says "q"
    signal.signal(signal.SIGHUP, signal.SIG_IGN)      # a hangup is the server's to act on
    config, early = _read_config()
    out = JSONLines()
    # [log] level applies here already (what the server would drop is not sent); the access log
    # passes at info, as in the server (logs.make_observer).
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[config.log.level])
    predicate.setLogLevelForNamespace(ACCESS, LogLevel.debug if config.log.level == "debug" else LogLevel.info)
    observer: Any = FilteringLogObserver(out, [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    reactor: Any = _reactor
    wake = _Wake(lambda: out.write_line(WAKE.decode()))
    top, dirsvc = build(config, wake if config.office365.enabled else None)
    ctx = starttls_context(config)
    limits = ConnectionLimits(config.ldap.max_connections, config.ldap.max_connections_per_address)
    stopping: list[bool] = []
    ports: list[Any] = []

    def quit_() -> None:
        if not stopping:
            stopping.append(True)
            reactor.stop()                            # the "before shutdown" trigger stops the tree

    async def stop_all() -> None:
        await defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports], consumeErrors=True)
        await defer.maybeDeferred(top.stopService)

    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(stop_all()))
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(quit_))
    top.privilegedStartService()
    top.startService()
    for i, description in enumerate(config.ldap.listen):
        factory = LDAPServerFactory(dirsvc.directory, config.ldap, starttls_context=ctx,
                                    is_tls_listener=description.startswith("ssl:"), limits=limits,
                                    access=config.log.access)
        ports.append(_adopt(reactor, FIRST_FD + i, description, factory))
    log.info("LDAP process {index} (pid {pid}) answering", index=args.index, pid=os.getpid())
    threading.Thread(target=read_commands, args=(reactor, quit_, {HUNGRY: wake.on_hungry}, early), name="ldap-commands",
                     daemon=True).start()
    reactor.run(installSignalHandlers=False)
    os._exit(0)                                       # the database's pool threads are not daemons


if __name__ == "__main__":
    main()
