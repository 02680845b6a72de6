"""LISTEN/NOTIFY: wake the outbox worker of every node the moment outbox rows are committed.

PostgreSQL only (SQLite is single-node: the planner wakes its own worker after COMMIT).

The planner's write transaction (and the reconciler's, and the CLI's ``o365 release`` /
``reconcile --retry-errors``) runs ``NOTIFY ldapsync_outbox`` when it queued work
(``ldapsync/store/outbox.py: notify_txn``).  PostgreSQL delivers a notification only when
that transaction commits, so a woken worker always sees the rows.  Each node keeps one
dedicated connection (not from the pool, autocommit) that LISTENs on the channel::

    other node: INSERT o365_outbox … NOTIFY ldapsync_outbox ── COMMIT ──┐
                                                                        ▼
    this node:  listener thread ── conn.notifies(timeout) ──▶ reactor.callFromThread(worker.wake)
                 │  (a burst of notifications is one wake while the last one is still pending)
                 ├─ idle: SELECT 1 every ``ping_interval`` (finds a connection that died silently)
                 └─ connection lost: log once, reconnect with capped backoff; after (re)connecting
                    wake the worker once (a notification sent while nobody listened is gone; the
                    worker's 1-second poll is the safety net either way)

``stop()`` ends the thread within ``timeout`` seconds and closes the connection.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, Unpack

from twisted.internet import defer, threads
from twisted.logger import Logger

from ldapsync.store.outbox import NOTIFY_CHANNEL

if TYPE_CHECKING:
    import psycopg
    from sqlalchemy.engine import Engine

    from ldapsync.store.database import Database

log = Logger()


class CallsFromThreads(Protocol):
    """What the listener needs of the reactor (Twisted's ``IReactorFromThreads``)."""

    def callFromThread(self, callable: Callable[..., object], *args: object, **kwargs: object) -> None: ...


class ListenerOptions(TypedDict, total=False):
    """The keyword arguments :meth:`OutboxListener.for_database` passes on."""

    channel: str
    timeout: float
    ping_interval: float
    backoff: tuple[float, float]


def connect_kwargs(engine: Engine) -> dict[str, Any]:
    """psycopg.connect() keyword arguments for the engine's database (same host, user, password, options;
    values of any type, as the SQLAlchemy dialect makes them)."""
    _args, params = engine.dialect.create_connect_args(engine.url)
    params = {k: v for k, v in params.items() if k != "context"}
    params.setdefault("connect_timeout", 10)
    return params


class OutboxListener:
    """A thread that LISTENs on :data:`NOTIFY_CHANNEL` and calls ``wake()`` on the reactor thread."""

    def __init__(self, connect_params: dict[str, Any], wake: Callable[[], object], *, reactor: CallsFromThreads,
                 channel: str = NOTIFY_CHANNEL,
                 timeout: float = 0.5, ping_interval: float = 30.0, backoff: tuple[float, float] = (0.5, 30.0)) -> None:
        self.params = connect_params
        self.wake = wake
        self.reactor = reactor
        self.channel = channel
        self.timeout = timeout
        self.ping_interval = ping_interval
        self.backoff = backoff
        self.received = 0                 # notifications seen (tests, diagnostics)
        self.connects = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending = False
        self._conn: psycopg.Connection[Any] | None = None

    @classmethod
    def for_database(cls, db: Database, wake: Callable[[], object], *, reactor: CallsFromThreads,
                     **kw: Unpack[ListenerOptions]) -> OutboxListener:
        return cls(connect_kwargs(db.engine), wake, reactor=reactor, **kw)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ldapsync-outbox-listen", daemon=True)
        self._thread.start()

    def stop(self) -> defer.Deferred:
        """Ask the thread to end; the Deferred fires once it has (and its connection is closed)."""
        self._stop.set()
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._thread = None
            return defer.succeed(None)
        return threads.deferToThread(self.join)

    def join(self, timeout: float | None = None) -> None:
        """Blocking: ask the thread to end and wait for it (at most a few ``timeout`` periods)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout if timeout is not None else self.timeout * 4 + 10)

    # -- reactor side ---------------------------------------------------------------------
    def _signal(self) -> None:
        """From the listener thread: wake the worker (coalesced while a wake is still pending)."""
        if self._pending:
            return      # the pending call runs after this notification arrived: the worker will see the rows
        self._pending = True
        self.reactor.callFromThread(self._fire)

    def _fire(self) -> None:
        self._pending = False
        if self._stop.is_set():
            return
        try:
            self.wake()
        except Exception:  # noqa: BLE001
            log.failure("outbox listener: waking the worker failed")

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        import psycopg

        delay = self.backoff[0]
        lost_logged = False
        while not self._stop.is_set():
            try:
                conn = psycopg.connect(**self.params, autocommit=True)
            except (psycopg.Error, OSError) as e:
                if not lost_logged:
                    log.warn("outbox listener: cannot connect to PostgreSQL ({error}); retrying "  # noqa: G010
                             "(the worker polls meanwhile)", error=_short(e))
                    lost_logged = True
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff[1])
                continue
            self._conn = conn
            try:
                conn.execute(f"LISTEN {self.channel}")
                self.connects += 1
                if self.connects == 1:
                    log.info("outbox listener: listening on {channel}", channel=self.channel)
                else:
                    log.info("outbox listener: listening on {channel} again", channel=self.channel)
                lost_logged = False
                delay = self.backoff[0]
                self._signal()                   # catch up on whatever was committed while not listening
                self._listen(conn)
            except Exception as e:  # noqa: BLE001  (psycopg.Error, OSError; anything else must not end the thread)
                if not self._stop.is_set():
                    log.warn("outbox listener: connection lost ({error}); reconnecting",  # noqa: G010
                             error=_short(e))
                    lost_logged = True
                    self._stop.wait(delay)
                    delay = min(delay * 2, self.backoff[1])
            finally:
                self._conn = None
                with contextlib.suppress(Exception):
                    conn.close()
        log.info("outbox listener: stopped")

    def _listen(self, conn: psycopg.Connection[Any]) -> None:
        last_activity = time.monotonic()
        while not self._stop.is_set():
            got = False
            for _ in conn.notifies(timeout=self.timeout):
                got = True
                self.received += 1
                self._signal()
            now = time.monotonic()
            if got:
                last_activity = now
            elif now - last_activity >= self.ping_interval:
                conn.execute("SELECT 1")         # raises when the connection died without a word
                last_activity = now


def _short(e: BaseException) -> str:
    """An error without its (possibly multi-line) detail; psycopg never puts the password in it."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
