"""SQLite group commit: write transactions queued together share one COMMIT (one fsync).

With ``[directory] durability = "full"`` every SQLite COMMIT waits for an fsync of the WAL;
one COMMIT per LDAP write made writes 2-4 times slower.  Like PostgreSQL and slapd, the
writer thread commits the writes that queued up while it was busy in one transaction::

    run_interaction(write) ─▶ queue ─▶ writer thread: BEGIN IMMEDIATE
                                          SAVEPOINT w; fn₁(txn); RELEASE w
                                          SAVEPOINT w; fn₂(txn) raises → ROLLBACK TO w; RELEASE w
                                          SAVEPOINT w; fn₃(txn); RELEASE w
                                        COMMIT (one fsync) ─▶ reactor: results in queue order,
                                                              each one's call_after hooks after COMMIT

- Each write sees the ones before it in the group (they run one after the other, as before),
  and one that fails rolls back only its savepoint: its caller gets its error, the others commit.
- A write is acknowledged (its Deferred fires, its ``call_after`` hooks run) only after the
  COMMIT that holds it.  A failed COMMIT fails every write of the group with a StoreError and
  none is tried again (a COMMIT that failed may still have landed).
- If SQLite rolled the whole transaction back under a failing write (I/O error, disk full:
  the savepoint is gone), the group's other writes, not acknowledged yet, run again one by one.
- A group of one, and a group whose BEGIN fails, run through :meth:`Database._run` (its lock
  waits and retries) one write at a time.

Owns nothing but this queue; SQL and connections are the Database's.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

# database.py imports this module only when a Database is built, so no import cycle
from ldapsync.store.database import StoreError, Txn, _begin_write, _rollback

if TYPE_CHECKING:
    from ldapsync.store.database import Database

log = Logger()
MAX_GROUP = 64       # writes per COMMIT at most: a long group delays the first one's answer


@dataclass
class Item:
    desc: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kw: dict[str, Any]
    d: Deferred = field(default_factory=Deferred)
    outcome: Any = None          # (result, after-commit callbacks) or a Failure
    done: bool = False


class GroupWriter:
    """The SQLite write queue of one :class:`Database` (see the module docstring).

    ``deliver(fn, *args)`` runs ``fn`` on the reactor thread (``reactor.callFromThread``);
    ``submit`` is called on the reactor thread, ``drain`` runs on the writer thread."""

    def __init__(self, db: Database, submit_job: Callable[[Callable[[], None]], None],
                 deliver: Callable[..., None], max_group: int = MAX_GROUP) -> None:
        self.db = db
        self._submit_job = submit_job
        self._deliver = deliver
        self.max_group = max_group
        self._queue: list[Item] = []
        self._lock = threading.Lock()
        self._scheduled = False
        self.groups = 0              # COMMITs of more than one write (tests, diagnostics)

    def submit(self, desc: str, fn: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any]) -> Deferred:
        item = Item(desc, fn, args, kw)
        with self._lock:
            self._queue.append(item)
            schedule = not self._scheduled
            self._scheduled = True
        if schedule:
            self._submit_job(self.drain)
        return item.d

    def restart(self) -> None:
        """The write pool (re)started: writes queued while it was stopped run now."""
        with self._lock:
            schedule = bool(self._queue)
            self._scheduled = schedule
        if schedule:
            self._submit_job(self.drain)

    def drain(self) -> None:
        """Writer thread: run what is queued, a group at a time, until the queue is empty."""
        while True:
            with self._lock:
                batch = self._queue[:self.max_group]
                del self._queue[:self.max_group]
                if not batch:
                    self._scheduled = False
                    return
            try:
                self.run_group(batch)
            except BaseException:  # noqa: BLE001 - a bug here must not leave callers waiting for ever
                f = Failure()
                log.failure("SQLite group commit failed", f)
                for item in batch:
                    if not item.done:
                        self._finish(item, f)

    # -- one group ---------------------------------------------------------------------------
    def _finish(self, item: Item, outcome: Any) -> None:
        item.done = True
        if isinstance(outcome, Failure):
            self._deliver(item.d.errback, outcome)
        else:
            self._deliver(item.d.callback, outcome)

    def _alone(self, item: Item) -> None:
        """One write in a transaction of its own (Database._run: lock waits, retries)."""
        try:
            outcome: Any = self.db._run(item.desc, item.fn, item.args, item.kw, True)
        except BaseException:  # noqa: BLE001 - handed to the caller
            outcome = Failure()
        self._finish(item, outcome)

    def run_group(self, batch: list[Item]) -> None:
        if len(batch) == 1:
            self._alone(batch[0])
            return
        raw = self.db._connection()
        try:
            _begin_write(raw)
        except Exception:  # noqa: BLE001 - each write then waits and retries on its own
            for item in batch:
                self._alone(item)
            return
        ran: list[Item] = []         # ran inside this transaction, waiting for the COMMIT
        for i, item in enumerate(batch):
            txn = Txn(raw, False)
            try:
                raw.execute("SAVEPOINT w")
            except sqlite3.Error:
                self._lost(raw, ran, batch[i:])
                return
            try:
                result = item.fn(txn, *item.args, **item.kw)
            except BaseException:  # noqa: BLE001 - this write's own failure, handed to its caller
                failure = self._as_store_error(item.desc, Failure())
                if not self._undo(raw):
                    self._finish(item, failure)
                    self._lost(raw, ran, batch[i + 1:])
                    return
                item.outcome = failure
                ran.append(item)
                continue
            try:
                raw.execute("RELEASE w")
            except sqlite3.Error:
                self._lost(raw, ran, batch[i:])
                return
            item.outcome = (result, txn._after)
            ran.append(item)
        try:
            raw.commit()
        except BaseException as e:  # noqa: BLE001 - every write of the group fails; none is retried
            _rollback(raw)
            failure = Failure(StoreError.during(f"COMMIT of {len(ran)} writes", e))
            for item in ran:
                self._finish(item, item.outcome if isinstance(item.outcome, Failure) else failure)
            return
        self.groups += 1
        if self.db._checkpointer is not None:
            self.db._checkpointer.poke()
        for item in ran:
            self._finish(item, item.outcome)

    def _undo(self, raw: Any) -> bool:
        """Roll back the failed write's savepoint; False if SQLite already rolled back everything."""
        if not raw.in_transaction:
            return False
        try:
            raw.execute("ROLLBACK TO w")
            raw.execute("RELEASE w")
        except sqlite3.Error:
            return False
        return True

    def _lost(self, raw: Any, ran: list[Item], rest: list[Item]) -> None:
        """The transaction is gone: nothing of it was committed or acknowledged; writes that
        failed on their own keep their error, the others run again one by one."""
        _rollback(raw)
        log.warn("SQLite rolled back a group of {n} writes; running them one by one", n=len(ran) + len(rest))
        for item in ran + rest:
            if isinstance(item.outcome, Failure):
                self._finish(item, item.outcome)
            else:
                item.outcome = None
                self._alone(item)

    def _as_store_error(self, desc: str, f: Failure) -> Failure:
        """Database errors become StoreError as in Database._run; anything else is the caller's."""
        e = f.value
        if isinstance(e, (DBAPIError, self.db._dbapi_error)):
            return Failure(StoreError.during(desc, e))
        return f
