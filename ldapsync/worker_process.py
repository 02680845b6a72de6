"""The Microsoft 365 side of a server in its own process, supervised by the LDAP server.

Owns the child process's lifecycle (start, wake, stop, restart after a crash) and the child's
entry point.  What runs in the child is ``sync/``'s: the connector's checks
(``sync/connector.py``), the outbox worker (``sync/worker.py``), the reconcile loop and, on
PostgreSQL, the LISTEN thread (``sync/notify.py``).  The LDAP process keeps the directory, the planner (outbox
rows in the LDAP write's transaction) and the self-service pages.

Why a process: Python runs one thread at a time (the GIL), so in the LDAP process every
millisecond the worker spends on TLS, JSON, claims, status writes and log lines is one LDAP
does not get.  Paced to Graph's write budget the worker is light (~4 ms of CPU per PATCH, ~19
PATCHes a second) and where it runs makes no measurable difference; when it works flat out
(a drain without pacing, a reconcile scan of thousands of users) it took LDAP's core: modifies
during an unthrottled drain ran 49-54% below connector-off in one process, 33-36% with the
worker in its own (tests/perf/bench_propagation.py modify-cost --server-pacing off, 4 rounds).

::

    LDAP process (twistd)                              worker process (python -m ldapsync.worker_process)
    planner: COMMIT ─ call_after(wake) ─▶ "w" on the child's stdin ─▶ worker.wake()
                      (only if the child said "c": caught up, nothing left to claim; a busy
                       worker claims again whenever a delivery ends and needs no wake)
    (the other LDAP processes, [ldap] processes > 1: their COMMITs reach wake() through the
     server, only after it passed the child's "c" on to them as "h": ldapsync/ldap_processes.py)
    parent ◀── "c" line on the child's stdout ◀── worker.caught_up (once per "w" received)
    stopService ──────────────────────────▶ "q" ─▶ graceful stop: deliveries in flight end, leases
                                                    given back, exit 0 (the parent waits for it)
    log observer ◀── one JSON line per log event on the child's stdout (stderr: raw lines, as errors)
    child exits unexpectedly ─▶ logged, started again after a capped backoff
    parent killed (kill -9) ─▶ the child gets SIGKILL at once (Linux PR_SET_PDEATHSIG; elsewhere
                               stdin EOF) — the same crash the single process had: leases are
                               released when the server starts again

SQLite: both processes write the same database file (WAL); a write waits for the other
process's write lock (``store/database.py: _begin_write``).  PostgreSQL: the child is the node's worker as before (NOTIFY wakes
it; the node id, from the config, is the same in both processes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.base import DelayedCall
from twisted.logger import FilteringLogObserver, Logger, LogLevelFilterPredicate, globalLogBeginner

from ldapsync import metrics
from ldapsync.child_processes import QUIT, JSONLines, LineChildProtocol, die_with_parent, read_commands
from ldapsync.config import Config, load_config
from ldapsync.logs import LEVELS
from ldapsync.services import ConnectorService, DirectoryService, OrderedMultiService, OutboxWorkerService
from ldapsync.sync.connector import ensure_entries_txn

log = Logger()

WAKE = b"w"
CAUGHT_UP = b"c"              # child → parent, a line of its own: "wake me at the next COMMIT"
_child_log = Logger(namespace="ldapsync.o365-worker")


# -- the LDAP process's side ---------------------------------------------------------------------

class _ChildProtocol(LineChildProtocol):
    def control(self, line: bytes) -> bool:
        if line == CAUGHT_UP:
            self.owner._caught_up()
            return True
        return False

    def raw(self, line: bytes) -> None:
        _child_log.error("{log_child_text}", log_child_text=line.decode("utf-8", "replace").rstrip())


class WorkerProcessService(service.Service):
    """Starts the worker process after the connector's entries exist; stops it before the database.

    ``argv`` is the child's command line (tests and benchmarks may name another interpreter);
    the default runs this module with the server's config file."""

    restart_backoff = (1.0, 30.0)
    stop_timeout = 20.0           # the child's own grace (deliveries in flight: 5 s) plus giving leases back

    def __init__(self, dirsvc: DirectoryService, argv: list[str] | None = None) -> None:
        self.dirsvc = dirsvc
        config = dirsvc.config
        self.argv = argv or [sys.executable, "-m", "ldapsync.worker_process",
                             "--config", os.path.abspath(config.source)]
        self.proto: _ChildProtocol | None = None
        self._hungry = False
        self._work_since_wake = False
        # [ldap] processes > 1: told when the child is caught up, so that the other LDAP
        # processes' next COMMIT wakes it through wake() (ldapsync/ldap_processes.py)
        self.on_hungry: list[Callable[[], object]] = []
        self._stdin_fd: int | None = None
        self._stopping = False
        self._backoff = self.restart_backoff[0]
        self._restart_call: DelayedCall | None = None
        self._started_at = 0.0

    def startService(self) -> None:
        from twisted.internet import reactor

        super().startService()
        # Any: the global reactor is typed by Twisted's zope interfaces, whose methods (declared
        # without self) plain mypy cannot call through; here it spawns processes and keeps time.
        self.reactor: Any = reactor
        self._stopping = False

        async def start() -> None:
            d = self.dirsvc.directory
            # Here, not in the child: the tag group exists before any LDAP client can look for it.
            await self.dirsvc.db.run_interaction("connector entries", lambda txn: ensure_entries_txn(d, txn))
            if not self._stopping:
                self._spawn()
        defer.ensureDeferred(start()).addErrback(
            lambda f: log.failure("Microsoft 365 worker process: could not start", f))

    def _spawn(self) -> None:
        self._restart_call = None
        self.proto = _ChildProtocol(self)
        env = dict(os.environ)
        env["LDAPSYNC_PARENT_PID"] = str(os.getpid())
        process = self.reactor.spawnProcess(self.proto, self.argv[0], self.argv, env=env, path=os.getcwd(),
                                            childFDs={0: "w", 1: "r", 2: "r"})
        self._stdin_fd = process.pipes[0].fileno()
        self._hungry = False          # the child's first drain says so when it is
        self._work_since_wake = True
        self._started_at = self.reactor.seconds()
        log.info("Microsoft 365 worker process started (pid {pid})", pid=self.pid)

    @property
    def pid(self) -> int | None:
        t = getattr(self.proto, "transport", None)
        return getattr(t, "pid", None)

    def wake(self) -> None:
        """Called after every COMMIT that queued rows.

        A byte goes to the child only when it has said it is caught up (its last claim found
        fewer ready users than it had room for): a busy worker claims again as each delivery ends
        and needs no wake.  This runs once per LDAP write of a bound user; a byte per COMMIT cost
        the LDAP process ~5% of its modify throughput, mostly in taking the GIL back after the
        write system call."""
        if self._hungry:
            self._hungry = False
            self._write_wake()
        else:
            self._work_since_wake = True

    def _caught_up(self) -> None:
        """The child found nothing more to claim: wake it at the next COMMIT, or now if rows were
        committed since the last wake (its claim may have run before they were)."""
        if self._work_since_wake:
            self._write_wake()
        else:
            self._hungry = True
            for tell in self.on_hungry:
                tell()

    @property
    def hungry(self) -> bool:
        """The child is caught up and waits for a wake."""
        return self._hungry

    def _write_wake(self) -> None:
        self._work_since_wake = False
        fd = self._stdin_fd
        if fd is None:
            return
        try:
            os.write(fd, WAKE)       # straight to the non-blocking pipe: no reactor round trip
        except BlockingIOError:
            pass                     # the pipe is full of wakes the child has yet to read: it is awake
        except OSError:
            self._stdin_fd = None    # the child is gone; _ended takes it from here

    def _ended(self, proto: _ChildProtocol, code: int | None, sig: int | None) -> None:
        if proto is not self.proto:
            return
        self.proto = None
        self._stdin_fd = None
        if self._stopping:
            return
        how = f"signal {sig}" if sig else f"exit code {code}"
        if self.reactor.seconds() - self._started_at > 60:
            self._backoff = self.restart_backoff[0]      # it had been running fine: not a crash loop
        wait = self._backoff
        self._backoff = min(self._backoff * 2, self.restart_backoff[1])
        log.error("Microsoft 365 worker process ended unexpectedly ({how}); starting it again in {wait:g}s "
                  "(queued changes wait, nothing is lost)", how=how, wait=wait)
        self._restart_call = self.reactor.callLater(wait, self._spawn)

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        self._stopping = True
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        proto = self.proto
        if proto is None or self.pid is None:
            return None
        pid = self.pid
        self._stdin_fd = None
        transport: Any = proto.transport      # a Process (closeStdin, signalProcess): see self.reactor
        transport.write(QUIT)
        transport.closeStdin()

        def too_slow() -> None:
            log.warn("Microsoft 365 worker process (pid {pid}) did not stop in {s:g}s; killing it "
                     "(its leases expire)", pid=pid, s=self.stop_timeout)
            with contextlib.suppress(ProcessExitedAlready, OSError):
                transport.signalProcess("KILL")
        call = self.reactor.callLater(self.stop_timeout, too_slow)

        def done(result: object) -> None:
            if call.active():
                call.cancel()
            return None
        return proto.ended.addBoth(done)


# -- the child ------------------------------------------------------------------------------------

def build(config: Config) -> tuple[service.MultiService, OutboxWorkerService]:
    """The child's service tree: database and directory (no bootstrap, no write hooks), connector, worker."""
    top = OrderedMultiService()
    dirsvc = DirectoryService(config, bootstrap=False)
    dirsvc.setServiceParent(top)
    connsvc = ConnectorService(config, dirsvc)
    connsvc.setServiceParent(top)
    worksvc = OutboxWorkerService(dirsvc, connsvc)
    worksvc.setServiceParent(top)
    return top, worksvc


def main(argv: list[str] | None = None) -> None:
    from twisted.internet import reactor as _reactor   # the default one: this child chooses no other


    ap = argparse.ArgumentParser(description="ldapsync's Microsoft 365 worker (started by the server)")
    ap.add_argument("--config", required=True)
    args = ap.parse_args(argv)
    die_with_parent()
    metrics.enable_from_environment()                 # count into the server's metrics ([metrics] listen)
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # Ctrl-C reaches the parent, which says "q"
    config = load_config(args.config)
    out = JSONLines()
    # [log] level applies here already: what the parent would drop is not sent to it at all.
    # (Any: it provides ILogObserver through zope's @implementer, which plain mypy does not see.)
    observer: Any = FilteringLogObserver(out, [LogLevelFilterPredicate(defaultLogLevel=LEVELS[config.log.level])])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    reactor: Any = _reactor                           # Any: see WorkerProcessService.startService
    top, worksvc = build(config)
    stopping: list[bool] = []

    def quit_() -> None:
        if not stopping:
            stopping.append(True)
            reactor.stop()                            # the "before shutdown" trigger stops the tree

    said = [False]           # "caught up" said since the last wake byte: once is enough

    def caught_up() -> None:
        if not said[0]:
            said[0] = True
            out.write_line(CAUGHT_UP.decode())

    def wake() -> None:
        said[0] = False
        if worksvc.worker is not None:
            worksvc.worker.wake()

    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    # SIGTERM (a service manager stopping the whole group): the graceful stop "q" asks for.
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(quit_))
    top.privilegedStartService()
    top.startService()
    if worksvc.worker is not None:
        worksvc.worker.caught_up = caught_up
    threading.Thread(target=read_commands, args=(reactor, quit_, {WAKE: lambda: reactor.callFromThread(wake)}),
                     name="worker-commands", daemon=True).start()
    reactor.run(installSignalHandlers=False)
    os._exit(0)                                       # the database's pool threads are not daemons


if __name__ == "__main__":
    main()
