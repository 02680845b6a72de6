"""The database: engine, thread pools and ``run_interaction``.

Owns the SQLAlchemy engine and the threads SQL runs on.  Every piece of SQL in
ldapsync runs inside :meth:`Database.run_interaction` (or its blocking twin
:meth:`Database.run_sync` for the CLI), on a thread pool, never on the reactor
thread -- except short SQLite reads through :meth:`Database.run_read` (below),
which never wait for a lock.  One call is one transaction; functions it runs end in ``_txn`` and
take the connection first.  Callbacks registered with ``txn.call_after`` run
on the reactor thread only once the transaction has committed.

``[directory] durability`` (``durability=``): "full" (the default) makes a
COMMIT durable before it returns -- SQLite ``synchronous=FULL`` (the WAL is
fsynced at every COMMIT), PostgreSQL ``synchronous_commit`` on; "normal"
(SQLite ``synchronous=NORMAL``, PostgreSQL ``synchronous_commit = off``) is
faster but a power loss can roll back writes already acknowledged.

SQLite runs in WAL mode with one writer thread (SQLite allows one writer
anyway) and ``BEGIN IMMEDIATE`` so a write waits for the lock at its start
instead of failing half-way; PostgreSQL gets a pool of writer threads and
retries serialization failures and deadlocks.

Each SQL pool thread (and the main thread) keeps one DBAPI connection from the
engine's pool for its life (:meth:`Database._connection`; other threads borrow
one per transaction) and runs BEGIN/COMMIT on it itself: checking a
connection out of SQLAlchemy's pool and going through its transaction objects
for every LDAP operation cost ~85 µs, ten times the SQLite transaction itself.
A PostgreSQL connection found broken is dropped and the transaction retried on
a new one (what ``pool_pre_ping`` did before).

Short reads on SQLite (:meth:`Database.run_read`: a search's first chunk, a bind's entry) run
on the reactor thread itself, on a connection of its own, instead of a pool thread: the hop
there and back (a queue, a thread wake-up, a pipe write to wake the reactor, and the GIL
changing hands each way) cost more CPU than the indexed lookup.  Such a read never waits: in
WAL mode readers take no lock a writer holds; the connection's ``busy_timeout`` is 0, so the
rare moment a reader could wait (another process recovering the WAL) is an error, and a
progress handler interrupts any statement past ``INLINE_READ_STEPS`` SQLite VM steps (a
search that selects many entries).  Either way the transaction is rolled back and run again
on the read pool, as before.  Each read is its own transaction on the newest committed
state, exactly as on a pool thread: nothing is cached.

SQLite checkpoints (copying the WAL's pages back into the database file) run
on a thread of their own, :class:`Checkpointer`, not in the writer's COMMIT::

    writer thread:  BEGIN … COMMIT ─ poke ─▶ checkpoint thread: PRAGMA wal_checkpoint(PASSIVE)
                    (every COMMIT past          (own connection; copies and fsyncs while the
                     CHECKPOINT_FRAMES frames:   writer goes on; never waits for a lock)
                     a PASSIVE checkpoint of
                     the few frames left, so the next BEGIN starts the WAL afresh)

SQLite's default, a checkpoint inside the COMMIT that takes the WAL past 1,000
frames, took 9-10% of the writer thread's time copying pages (py-spy; fsync is
~0.1 ms on the benchmark machine), and every LDAP write waits for that one thread.  The writer keeps a checkpoint
of its own past ``CHECKPOINT_FRAMES``: the WAL can only start again from its
beginning once everything in it has been copied, which a thread running beside
a busy writer never quite achieves; by then the background thread has copied
all but the last few frames.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from twisted.internet import threads
from twisted.logger import Logger
from twisted.python import threadable
from twisted.python.threadpool import ThreadPool

from ldapsync.store.tables import metadata

if TYPE_CHECKING:
    from ldapsync.store.group_commit import GroupWriter

T = TypeVar("T")
_PG_SQL: dict[str, str] = {}
log = Logger()


class StoreError(Exception):
    """The database could not do what was asked (unreachable, locked too long...)."""

    @classmethod
    def during(cls, desc: str, e: BaseException) -> StoreError:
        """The error a caller sees for a database error ``e`` (SQLAlchemy's or the driver's) in ``desc``."""
        orig = getattr(e, "orig", e)
        return cls(f"database error during {desc}: {type(orig).__name__}: {orig}")


@dataclass
class Txn:
    """A DBAPI connection inside one transaction plus its after-commit callbacks."""

    raw: Any
    is_postgres: bool
    _after: list[tuple[Callable[..., Any], tuple[Any, ...]]] = field(default_factory=list)

    # Plain DBAPI cursors: building SQLAlchemy expressions per request cost more than
    # the queries themselves.  SQL is written with "?" placeholders and converted for psycopg.
    def cursor(self) -> Any:
        return self.raw.cursor()

    def sql(self, text: str) -> str:
        if not self.is_postgres:
            return text
        got = _PG_SQL.get(text)
        if got is None:
            got = _PG_SQL[text] = text.replace("%", "%%").replace("?", "%s")
        return got

    def rows(self, text: str, params: Sequence[Any] = ()) -> list[Any]:
        cur = self.cursor()
        cur.execute(self.sql(text), params)
        return cur.fetchall()

    def run(self, text: str, params: Sequence[Any] = ()) -> Any:
        cur = self.cursor()
        cur.execute(self.sql(text), params)
        return cur

    def run_many(self, text: str, params: Sequence[Sequence[Any]]) -> None:
        if params:
            self.cursor().executemany(self.sql(text), params)

    def call_after(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the reactor thread after COMMIT (never on rollback)."""
        self._after.append((fn, args))


DURABILITY = ("full", "normal")


def display_url(url: str) -> str:
    """``url`` with its password masked (``***``), for anything printed or logged."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: show nothing that could hold a secret
        return "<a database URL SQLAlchemy cannot read>"


def _sqlite_setup(engine: Engine, durability: str) -> None:
    # "full": SQLite fsyncs the WAL at every COMMIT, so an acknowledged write (and the Microsoft 365
    # change it queued) survives a power loss; "normal": only at checkpoints, so the last
    # transactions before a power loss (not a crash of the process) can be rolled back.
    synchronous = "FULL" if durability == "full" else "NORMAL"

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA cache_size=-65536")
        cur.execute("PRAGMA temp_store=MEMORY")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        if conn.get_execution_options().get("ldapsync_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def make_engine(url: str, durability: str = "full") -> Engine:
    """The engine; ``durability`` is ``[directory] durability`` ("full" or "normal")."""
    if durability not in DURABILITY:
        raise ValueError(f"durability must be one of {', '.join(DURABILITY)}, not {durability!r}")
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=False)
        _sqlite_setup(engine, durability)
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    engine = sa.create_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)

    # "normal", our sessions only: COMMIT returns before the WAL reaches disk; a crash of the
    # PostgreSQL server can lose the last commits (up to 3 × wal_writer_delay).  "full" keeps the
    # server's setting (on, or stronger with synchronous replicas) and only turns "off" back on.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            if durability == "normal":
                cur.execute("SET synchronous_commit = off")
            else:
                cur.execute("SHOW synchronous_commit")
                row = cur.fetchone()
                if row is not None and row[0] == "off":
                    cur.execute("SET synchronous_commit = on")
        dbapi_conn.commit()
    return engine


def _retryable(exc: BaseException, is_postgres: bool) -> bool:
    orig = getattr(exc, "orig", exc)
    if is_postgres:
        return getattr(orig, "sqlstate", None) in ("40001", "40P01")
    return "locked" in str(orig) or "busy" in str(orig)


# Twisted names pool threads "PoolThread-<pool name>-<n>" (the pools of Database.__init__).
_OWN_THREADS = ("PoolThread-ldapsync-sql-",)
_UNKNOWN = object()          # the isolation level of a borrowed connection: always set
LOCK_WAIT = 30.0             # SQLite: how long a write waits for another process's write lock
# SQLite: the writer's own checkpoint (wal_autocheckpoint) once the WAL holds this many frames
# (pages; 16 MiB at 4 KiB): it bounds the WAL under sustained writes.  The Checkpointer copies
# all but the newest few before that, so the writer's checkpoint is short.
CHECKPOINT_FRAMES = 4000
# SQLite: VM steps a read on the reactor thread may run before it is interrupted and handed to the
# read pool (:meth:`Database.run_read`).  An indexed lookup of one entry takes well under 1,000;
# 10,000 is about a millisecond; selecting 200 of 10,000 users by objectClass took 54,000.
INLINE_READ_STEPS = 10_000
_INLINE_STEP = 1_000         # the progress handler runs every this many steps
_FELL_BACK = object()        # an inline read that has to run on the pool instead


def _begin_write(raw: Any) -> None:
    """SQLite ``BEGIN IMMEDIATE`` that waits for another process's write lock (the Microsoft 365
    worker process, the CLI) in steps of 0.1 to 2 ms.  SQLite's own busy handler sleeps 1, 2,
    5, 10 ms... between tries: with the worker process writing a few times a second, those
    oversleeps cost the LDAP writer thread more than the worker's transactions themselves."""
    delay, deadline = 0.0001, 0.0
    while True:
        try:
            raw.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            now = time.monotonic()
            if not deadline:
                deadline = now + LOCK_WAIT
            elif now > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.002)


class Checkpointer:
    """SQLite: WAL checkpoints on a thread of their own (see the module docstring).

    ``poke()`` after a COMMIT (cheap: a flag check when a pass is due anyway).  A pass is
    ``PRAGMA wal_checkpoint(PASSIVE)`` on a connection of its own with no busy wait: it copies
    what is committed and never blocks the writer; if another process's checkpoint holds the
    lock, the pass is skipped and the next poke tries again.  Passes are at least ``pause``
    apart, so a trickle of writes is not a pair of fsyncs each."""

    def __init__(self, connect: Callable[[], Any], pause: float = 0.02) -> None:
        self._connect = connect
        self.pause = pause
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.passes = 0              # completed passes (tests, diagnostics)
        self.frames_copied = 0

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="ldapsync-sql-checkpoint", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        if not self._wake.is_set():
            self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        fairy: Any = None
        try:
            while True:
                self._wake.wait()
                if self._stopping:
                    return
                self._wake.clear()
                try:
                    if fairy is None:
                        fairy = self._connect()
                        fairy.dbapi_connection.execute("PRAGMA busy_timeout=0")
                    row = fairy.dbapi_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except Exception as e:  # noqa: BLE001 - a checkpoint that could not run now runs at the next poke
                    if "locked" not in str(e) and "busy" not in str(e):
                        log.warn("SQLite checkpoint failed ({error}); the writer's own checkpoint takes over",
                                 error=f"{type(e).__name__}: {e}")
                        if fairy is not None:
                            with contextlib.suppress(Exception):
                                fairy.invalidate()
                            fairy = None
                        time.sleep(1.0)
                else:
                    if row is not None and row[0] == 0:
                        self.passes += 1
                        self.frames_copied += max(0, int(row[2]))
                time.sleep(self.pause)
        finally:
            if fairy is not None:
                with contextlib.suppress(Exception):
                    fairy.close()


def _from_thread(fn: Callable[..., Any], *args: Any) -> None:
    from twisted.internet import reactor

    reactor.callFromThread(fn, *args)


def _broken(raw: Any) -> bool:
    """A PostgreSQL connection that died (server restart, network): drop it and start afresh."""
    return bool(getattr(raw, "closed", False) or getattr(raw, "broken", False))


def _rollback(raw: Any) -> None:
    with contextlib.suppress(Exception):      # the original error is the one to report
        raw.rollback()


def _pg_isolation(level: str | None) -> Any:
    import psycopg

    return psycopg.IsolationLevel.REPEATABLE_READ if level == "REPEATABLE READ" else None


class Database:
    """The engine plus a read pool and a write pool; see the module docstring."""

    def __init__(self, url: str, *, readers: int = 4, writers: int | None = None, durability: str = "full") -> None:
        self.url = url
        self.durability = durability
        self.engine = make_engine(url, durability)
        self.is_postgres = self.engine.dialect.name == "postgresql"
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._dbapi_error = self.engine.dialect.loaded_dbapi.Error
        if writers is None:
            writers = 1 if self.is_sqlite else 4
        self._read_pool = ThreadPool(minthreads=1, maxthreads=readers, name="ldapsync-sql-read")
        self._write_pool = ThreadPool(minthreads=1, maxthreads=writers, name="ldapsync-sql-write")
        self._started = False
        self._local = threading.local()
        self._conns: set[Any] = set()           # every thread's pool connection, closed at stop()
        self._conns_lock = threading.Lock()
        self._generation = 0                    # bumped by stop(): threads then take a new connection
        self._checkpointer: Checkpointer | None = None
        if self.is_sqlite and (self.engine.url.database or ":memory:") != ":memory:":
            self._checkpointer = Checkpointer(self.engine.raw_connection)
        # SQLite file databases: short reads on the reactor thread (run_read), on this connection
        self.inline_reads = self._checkpointer is not None
        self._inline_fairy: Any = None
        self._inline_left = 0
        self.inline_done = 0                    # reads answered on the reactor thread (tests, diagnostics)
        self.inline_fell_back = 0               # ... and handed to the pool (too long, or a lock)
        # SQLite's one writer commits the writes queued while it was busy together (store/group_commit.py)
        self._group: GroupWriter | None = None
        if self.is_sqlite and writers == 1:
            from ldapsync.store.group_commit import GroupWriter

            self._group = GroupWriter(self, self._write_pool.callInThread, _from_thread)

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        if not self._started:
            self._read_pool.start()
            self._write_pool.start()
            if self._checkpointer is not None:
                self._checkpointer.start()
            if self._group is not None:
                self._group.restart()
            self._started = True

    def stop(self) -> None:
        if self._started:
            self._read_pool.stop()
            self._write_pool.stop()
            if self._checkpointer is not None:
                self._checkpointer.stop()
            self._started = False
        with self._conns_lock:
            conns, self._conns = self._conns, set()
            self._generation += 1
        self._inline_fairy = None               # it is in conns
        for fairy in conns:
            with contextlib.suppress(Exception):      # closing at shutdown: nothing to do about it
                fairy.close()
        self.engine.dispose()

    # -- this thread's connection -----------------------------------------
    def _pinned(self) -> bool:
        """Threads that keep a connection: our SQL pools' and the main thread (the CLI).  Any
        other thread (e.g. MSAL's, saving its token cache) borrows one per transaction, so the
        engine's pool is never exhausted by threads that come and go.  Decided once per thread."""
        local = self._local
        pinned = getattr(local, "pinned", None)
        if pinned is None:
            t = threading.current_thread()
            pinned = local.pinned = t is threading.main_thread() or t.name.startswith(_OWN_THREADS)
        return bool(pinned)

    def _connection(self) -> Any:
        """The calling thread's DBAPI connection, taken from the engine's pool once and kept
        (the pool's ``connect`` listener has set SQLite's PRAGMAs on it)."""
        local = self._local
        fairy = getattr(local, "fairy", None)
        if fairy is None or local.generation != self._generation:
            fairy = self.engine.raw_connection()
            with self._conns_lock:
                self._conns.add(fairy)
                local.generation = self._generation
            local.fairy = fairy
            local.isolation = None
            local.poll_lock = self.is_sqlite and threading.current_thread().name.startswith(
                f"PoolThread-{self._write_pool.name}")
            if local.poll_lock:
                raw: Any = fairy.dbapi_connection
                raw.execute("PRAGMA busy_timeout=0")    # _begin_write waits instead
                if self._checkpointer is not None:      # the Checkpointer copies; this bounds the WAL
                    raw.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_FRAMES}")
        return fairy.dbapi_connection

    def _drop_connection(self) -> None:
        fairy = getattr(self._local, "fairy", None)
        self._local.fairy = None
        if fairy is not None:
            with self._conns_lock:
                self._conns.discard(fairy)
            with contextlib.suppress(Exception):      # it is broken already
                fairy.invalidate()

    def has_schema(self) -> bool:
        """Whether the database holds ldapsync's tables (``ldapsync init`` or a server made them):
        the CLI refuses to work on one that does not, rather than create it empty."""
        insp = sa.inspect(self.engine)
        return insp.has_table("entries") and insp.has_table("alembic_version")

    def create_schema(self) -> None:
        """Bring the database schema to the newest version (Alembic)."""
        from ldapsync.store.migrate import upgrade

        upgrade(self.engine)

    # -- running transactions -------------------------------------------------
    def run_sync(self, desc: str, fn: Callable[..., T], *args: Any, write: bool = True, **kw: Any) -> T:
        """Run ``fn(txn, *args)`` in one transaction on the calling thread.

        After-commit callbacks are run right here (used by the CLI, which has
        no reactor).
        """
        result, after = self._run(desc, fn, args, kw, write)
        for cb, cb_args in after:
            cb(*cb_args)
        return result

    def _run(
        self, desc: str, fn: Callable[..., T], args: tuple[Any, ...], kw: dict[str, Any], write: bool
    ) -> tuple[T, list[tuple[Callable[..., Any], tuple[Any, ...]]]]:
        attempt = 0
        while True:
            attempt += 1
            raw: Any = None
            fairy: Any = None
            committing = False
            try:
                if self._pinned():
                    raw = self._connection()
                    isolation = self._local.isolation
                else:                        # a passing thread: borrow a connection for this one
                    fairy = self.engine.raw_connection()
                    raw, isolation = fairy.dbapi_connection, _UNKNOWN
                if self.is_postgres:
                    # a transaction starts with the first statement; readers see one snapshot
                    level = None if write else "REPEATABLE READ"
                    if isolation != level:
                        raw.isolation_level = _pg_isolation(level)
                        if fairy is None:
                            self._local.isolation = level
                elif write and fairy is None and self._local.poll_lock:
                    _begin_write(raw)
                else:
                    raw.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                txn = Txn(raw, self.is_postgres)
                try:
                    result = fn(txn, *args, **kw)
                    committing = True
                    raw.commit()
                except BaseException:
                    _rollback(raw)            # also after a failed COMMIT (SQLite keeps it open)
                    raise
                if write and self._checkpointer is not None:
                    self._checkpointer.poke()
                return result, txn._after
            except (OperationalError, DBAPIError, self._dbapi_error) as e:
                broken = raw is None or (self.is_postgres and _broken(raw))
                if broken:
                    if fairy is not None:
                        with contextlib.suppress(Exception):
                            fairy.invalidate()
                        fairy = None
                    else:
                        self._drop_connection()
                # A connection lost during COMMIT may have committed: running fn again could apply
                # the write twice, so only a connection lost before it is retried.
                if attempt < 5 and (_retryable(e, self.is_postgres) or (broken and not committing)):
                    log.info("retrying {desc} after {error}", desc=desc, error=type(getattr(e, "orig", e)).__name__)
                    time.sleep(0.01 * 2**attempt)
                    continue
                raise StoreError.during(desc, e) from e
            finally:
                if fairy is not None:
                    with contextlib.suppress(Exception):
                        if self.is_postgres and not write:
                            raw.isolation_level = None        # back to the pool as it came
                        fairy.close()

    async def run_interaction(self, desc: str, fn: Callable[..., T], *args: Any, write: bool = True, **kw: Any) -> T:
        """Run ``fn(txn, *args)`` in one transaction on a pool thread; await the result.

        ``txn.call_after`` callbacks fire on the reactor thread after COMMIT,
        before this returns.  SQLite writes queued together share one COMMIT, each in a
        savepoint of its own (``store/group_commit.py``).
        """
        from twisted.internet import reactor

        if write and self._group is not None:
            result, after = await self._group.submit(desc, fn, args, kw)
        else:
            pool = self._write_pool if write else self._read_pool
            result, after = await threads.deferToThreadPool(reactor, pool, self._run, desc, fn, args, kw, write)
        for cb, cb_args in after:
            try:
                cb(*cb_args)
            except Exception:
                log.failure("after-commit callback of {desc} failed", desc=desc)
        return result

    async def run_read(self, desc: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """A short read-only transaction ``fn(txn, *args)``: on a SQLite file database, run right
        here on the reactor thread when it is short (see the module docstring), else (too many VM
        steps, a lock, an error, PostgreSQL) as :meth:`run_interaction` with ``write=False``.

        ``fn`` must only read, and may be run twice (the pool's retries assume that already).
        """
        if self.inline_reads and self._started and threadable.isInIOThread():
            result = self._run_inline(fn, args, kw)
            if result is not _FELL_BACK:
                return result  # type: ignore[no-any-return]
        return await self.run_interaction(desc, fn, *args, write=False, **kw)

    def _progress(self) -> bool:
        self._inline_left -= 1
        return self._inline_left < 0            # True interrupts the statement

    def _inline_connection(self) -> Any:
        fairy = self._inline_fairy
        if fairy is None:
            fairy = self.engine.raw_connection()
            raw = fairy.dbapi_connection
            raw.execute("PRAGMA busy_timeout=0")    # never wait on the reactor: fall back instead
            raw.set_progress_handler(self._progress, _INLINE_STEP)
            with self._conns_lock:
                self._conns.add(fairy)
            self._inline_fairy = fairy
        return fairy.dbapi_connection

    def _run_inline(self, fn: Callable[..., T], args: tuple[Any, ...], kw: dict[str, Any]) -> T | object:
        try:
            raw = self._inline_connection()
            self._inline_left = INLINE_READ_STEPS // _INLINE_STEP
            raw.execute("BEGIN")
            try:
                result = fn(Txn(raw, False), *args, **kw)
                raw.commit()
            except BaseException:
                _rollback(raw)
                raise
        except sqlite3.Error as e:
            # Interrupted (too long), busy/locked (never waited for), or anything else: the
            # pool runs it again with its retries and error reporting.
            if not isinstance(e, sqlite3.OperationalError) or not any(
                    w in str(e) for w in ("interrupted", "locked", "busy")):
                fairy, self._inline_fairy = self._inline_fairy, None
                if fairy is not None:
                    with self._conns_lock:
                        self._conns.discard(fairy)
                    with contextlib.suppress(Exception):
                        fairy.invalidate()
            self.inline_fell_back += 1
            return _FELL_BACK
        self.inline_done += 1
        return result

    def metadata(self) -> sa.MetaData:
        return metadata
