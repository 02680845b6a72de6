"""The outbox worker: drains ``o365_outbox`` to Microsoft Graph (the queue mechanics).

Owns delivery's mechanics: claiming users' rows with leases, renewing and giving the
leases back, the retry policy (which errors retry, which stop the rows), the completion
transaction shared by the deliveries that end together (the sync status written back on
the user and the rows deleted), the heartbeat and this node's share of Graph's write
budget, waking and the queue depth.  Which Graph requests a user's newest desired state
turns into is ``graph_mapping.py``'s (``GraphMapping.apply``).  It never decides *what*
should propagate (the planner in ``outbox.py`` does, inside the LDAP write's
transaction) and holds no SQL of its own (``ldapsync/store/outbox.py``).

::

    planner wake (after COMMIT) ─┐
    poll every second ───────────┴─▶ _drain: connector active?  ──no──▶ wait (nothing dropped)
                                        │ yes
                                        ▼
                   claim_and_load_txn: lease up to N users (head row lease; SKIP LOCKED on PostgreSQL),
                                       their rows up to the newest non-held one, their entries;
                                       fast (head ready and due) but full once a second
                                        │            (one task per user, at most N in flight)
                                        ▼
               _process: the newest DesiredUser + the newest queued password (coalescing)
               graph_mapping.py: GraphMapping.apply (the Graph calls; an Outcome or an error)
                 bound ─▶ only updates, last delivery fine? PATCH the properties the rows name (no GET)
                       └▶ id known? GET ─▶ PATCH what differs (+ passwordProfile, accountEnabled)
                       └▶ unknown:  UPN exists? link (soft match) : POST /users
                 unbound / deleted ─▶ PATCH accountEnabled false ─▶ POST revokeSignInSessions
                                        │
          ┌─────────────────────────────┼──── _process: the outcome or the error ───┐
          ▼ success                     ▼ Transient (429/5xx/network)               ▼ permanent (400/403/conflict)
     status on the entry             rows stay: attempts+1,                   rows state='error' (kept, with their
     + DELETE rows (secrets too)     next_attempt_at = now + backoff          secret) until the user's next change or
     (one transaction)               (Retry-After honoured, capped)           `o365 reconcile --retry-errors`;
                                                                               o365SyncState=error, o365LastError

Deliveries that end together share one completion transaction (``_end``); while the write
pacer is backlogged they also wait ``end_gather`` (0.25 s) for each other: with SQLite every
transaction here is a turn of the database's one writer that LDAP writes wait behind.

Completing or failing rows (and writing the user's status) first checks, in the same
transaction, that the user's head row still carries this node and the fencing token
(``lease_gen``) of the claim the job came from: a node that stalled past ``outbox_lease``, or
was presumed dead, leaves the rows to whoever re-claimed them and its result is discarded
(logged).  A clean shutdown lets deliveries in flight finish (``stop_grace``, then cancels
them) and gives the node's leases back, so another node takes those users over at once.

Several nodes (PostgreSQL): each running node heartbeats in ``meta`` every ``heartbeat_interval``
(3 s).  The nodes delivering share Graph's write budget (per app and tenant): each paces its
client to 1/(delivering nodes) of it.  A node whose heartbeat has not changed for
``node_timeout`` (``[office365] node_timeout``, 15 s) is presumed dead (kill -9, power loss, a
frozen VM): the first node to notice removes its heartbeat and releases its leases in one
transaction (``take_over_txn``), and the nodes claim its users at once — within about
``node_timeout`` + 2 heartbeats of the death rather than after ``outbox_lease``.

Per user, rows are handled oldest first and all together: the newest payload is
the user's complete desired state, so applying it is applying every older row.
Passwords are decrypted (in ``graph_mapping.py``) only right before the request that
carries them and never appear in a log line, an error attribute or an exception message.
"""

from __future__ import annotations

import inspect
import os
import random
import socket
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet import defer, task
from twisted.internet.base import DelayedCall
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.logger import Logger

from ldapsync.clock import Timer
from ldapsync.secretbox import DecryptionError
from ldapsync.graph.errors import AuthError, GraphError, Transient, Unauthorized
from ldapsync.graph.pacing import WritePacer
from ldapsync.store import outbox as outbox_q
from ldapsync.store import reconcile_lease
from ldapsync.store.database import Txn
from ldapsync.store.entries import StoredEntry
from ldapsync.sync.connector import read_status_txn, write_status_txn
from ldapsync.sync.graph_mapping import ClaimLost, GraphMapping, PermanentError, known_changes
from ldapsync.sync.planner import DesiredUser
from ldapsync.sync.delivered import record_outcome_txn
from ldapsync.sync.password_plan import current_secret_row, purge_kept_passwords_txn
from ldapsync.sync.status import SyncState, entry_by_uuid_txn, write_user_status_txn

if TYPE_CHECKING:
    from ldapsync.sync.connector import Connector
    from ldapsync.directory.facade import Directory

log = Logger()


# A connector whose last check failed is checked again after 10 s, then backing off to 2 minutes.
ERROR_RECHECK = (10.0, 120.0)


@dataclass(frozen=True)
class RowBackoff:
    """How long a user's queued rows wait before they are tried again (Graph's own retries of one
    request are ``graph/exchange.py: RetryPolicy``)."""

    base: float = 2.0            # first retry after ~2 s, then doubling
    cap: float = 300.0           # never wait longer than 5 minutes between tries
    jitter: float = 0.5          # wait = delay * uniform(1 - jitter, 1)

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        d = min(self.cap, self.base * (2 ** max(0, attempts)))
        d *= 1 - self.jitter * random.random()
        if retry_after is not None:
            d = max(d, min(retry_after, self.cap))
        return d


@dataclass
class _Job:
    entry_uuid: str
    rows: list[outbox_q.OutboxRow]
    entry: StoredEntry | None
    started: float = field(default_factory=time.monotonic)
    deferred: defer.Deferred[None] | None = None   # the running _process (cancelled at shutdown after the grace period)

    @property
    def head(self) -> int:
        """The row whose lease makes the user ours (its oldest row, leased by the claim)."""
        return self.rows[0].id if self.rows else 0

    @property
    def gen(self) -> int:
        """The claim's fencing token (the head's ``lease_gen`` as the claim left it)."""
        return self.rows[0].lease_gen if self.rows else 0


def _guarded(fn: Callable[[], object]) -> defer.Deferred[object]:
    """Run a periodic job; a failure is logged and the loop goes on."""
    async def run() -> object:
        r = fn()
        return await r if inspect.isawaitable(r) else r

    d = defer.ensureDeferred(run())
    d.addErrback(lambda f: log.failure("outbox worker: periodic {name} failed", f, name=getattr(fn, "__name__", "job")))
    return d


def _claim_txn(txn: Txn, d: Directory, owner: str, now: float, lease: float, limit: int,
               exclude: list[str], full: bool) -> list[_Job]:
    return [_Job(uuid, rows, entry_by_uuid_txn(d, txn, uuid))
            for uuid, rows in outbox_q.claim_and_load_txn(txn, owner, now, lease, limit, exclude, full=full)]


def default_node_id(directory: Directory) -> str:
    """Stable across restarts of the same server (so it can drop its own stale leases at start)."""
    listen = directory.config.ldap.listen
    return f"{socket.gethostname()}/{listen[0] if listen else os.getpid()}"[:64]


class OutboxWorker:
    """See the module docstring.  ``connector`` gives ``client`` (GraphClient), ``state``, ``box``, ``check()``."""

    def __init__(self, directory: Directory, connector: Connector, *, reactor: IReactorTime, concurrency: int = 16,
                 poll_interval: float = 1.0, lease_seconds: float = 120.0, depth_interval: float = 5.0,
                 node_id: str | None = None, retry: RowBackoff = RowBackoff(), wall_time: Timer = time.time,
                 stop_grace: float = 5.0, heartbeat_interval: float = 3.0, node_ttl: float = 12.0,
                 node_timeout: float = 15.0) -> None:
        self.d = directory
        self.db = directory.db
        self.config = directory.config.office365
        self.connector = connector
        self.graph = GraphMapping(directory, connector)   # one user's desired state → Graph calls → Outcome
        self.reactor = reactor
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.depth_interval = depth_interval
        self.owner = node_id or default_node_id(directory)
        self.retry = retry
        self.wall_time = wall_time        # leases and next_at, compared with the planner's stamps: never the policy clock
        self.stop_grace = stop_grace
        self.claim_batch = max(1, concurrency // 4)
        # Claims are fast (users whose oldest row is ready and due) except one at least this
        # often: users behind a row stopped by an error or held, or backing off, with a newer
        # change due, wait at most this long (see store/outbox.py: claim_users_sql).
        self.full_claim_interval = 1.0
        self._full_claim_at = float("-inf")
        # While Graph's write budget sets the pace, completions gather this long before their
        # write transaction (see _end_loop).
        self.end_gather = 0.25
        self._inflight: dict[str, _Job] = {}
        self._idle_waiters: list[defer.Deferred] = []
        self._ends: list[tuple[str, Callable[[Txn], bool], defer.Deferred[bool]]] = []   # queued completions (group commit)
        self._ending = False
        self._running = False
        self._draining = False
        self._again = False
        self._scheduled: DelayedCall | None = None
        self._loops: list[task.LoopingCall] = []
        self._entry_state: str | None = None
        self._entry_state_at = 0.0
        self._last_check = 0.0
        self._paused_until = 0.0
        self._waiting_logged = False
        self._error_recheck = ERROR_RECHECK[0]
        self.delivered = 0
        # Called when a claim found fewer ready users than it had room for (the worker process
        # tells the LDAP process it wants a wake at the next COMMIT; until then none are sent).
        self.caught_up: Callable[[], None] | None = None
        # several nodes (PostgreSQL): heartbeats in meta, the write budget split between live nodes
        self.heartbeat_interval = heartbeat_interval
        self.node_ttl = node_ttl
        self.node_timeout = node_timeout      # a heartbeat unchanged this long: the node is presumed dead
        self._beats: dict[str, tuple[str, float]] = {}   # node → (its last heartbeat value, when it changed, by our wall_time)
        self._beat_ok_at: float | None = None  # when our last heartbeat went through (time.monotonic)
        self._my_beat: str | None = None       # the value it wrote
        self.live_nodes = 1

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        if self.db.is_sqlite:
            n = await self.db.run_interaction("o365 outbox: drop stale leases", outbox_q.release_all_leases_txn)
        else:
            n = await self.db.run_interaction("o365 outbox: drop own stale leases", outbox_q.release_leases_txn, self.owner)
        if n:
            log.info("Microsoft 365 outbox: {n} lease(s) from before a restart released", n=n)
        if await self.db.run_interaction("reconcile lease from before a restart", reconcile_lease.release_node_txn,
                                         self.owner):
            log.info("Microsoft 365: the reconcile lease this node held before a restart released")
        self._running = True
        jobs: list[tuple[float, Callable[[], object]]] = [(self.poll_interval, self.wake), (self.lease_seconds / 3, self._renew),
                                         (self.depth_interval, self._depth)]
        if self.db.is_postgres:
            # The first heartbeat before the first claim: a node that dies right after it claimed
            # has a heartbeat for the others to see stop (without one, its claims wait out the lease).
            await _guarded(self._heartbeat)
            jobs.insert(0, (self.heartbeat_interval, self._heartbeat))
        for interval, job in jobs:
            loop = task.LoopingCall(_guarded, job)
            loop.clock = self.reactor
            loop.start(interval, now=True).addErrback(lambda f: log.failure("outbox worker loop failed", f))
            self._loops.append(loop)

    def stop(self) -> defer.Deferred:
        """Stop claiming, let the deliveries in flight end, then give this node's leases back.

        Deliveries in flight get ``stop_grace`` seconds to finish (they usually take
        milliseconds); those still running then (waiting out a Retry-After, or a slow
        Graph) are cancelled.  Then every lease this node holds is released, so another
        node (or this one after a restart) takes those users over at once rather than
        after ``[office365] outbox_lease``.  The returned Deferred fires when that is
        done; the database must still be running until then.
        """
        self._running = False
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops.clear()
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        return defer.ensureDeferred(self._shutdown())

    def _idle(self) -> bool:
        return not self._inflight and not self._draining

    def _notify_idle(self) -> None:
        if self._idle():
            waiters, self._idle_waiters = self._idle_waiters, []
            for w in waiters:
                if not w.called:
                    w.callback(None)

    async def _wait_idle(self, timeout: float) -> bool:
        if self._idle():
            return True
        w: defer.Deferred = defer.Deferred()
        self._idle_waiters.append(w)
        w.addTimeout(timeout, self.reactor)
        try:
            await w
            return True
        except defer.TimeoutError:
            return False

    async def _shutdown(self) -> None:
        if self._inflight:
            log.info("Microsoft 365 outbox: stopping; {n} delivery(ies) in flight get {grace:g}s to finish",
                     n=len(self._inflight), grace=self.stop_grace)
        if not await self._wait_idle(self.stop_grace):
            jobs = list(self._inflight.values())
            log.info("Microsoft 365 outbox: stopping; cancelling {n} delivery(ies) still in flight", n=len(jobs))
            for job in jobs:
                if job.deferred is not None:
                    job.deferred.cancel()
            await self._wait_idle(2.0)
        if self.db.is_postgres:
            try:
                await self.db.run_interaction("o365 worker: heartbeat withdrawn", outbox_q.heartbeat_txn, self.owner,
                                              self.wall_time(), alive=False, forget_before=0.0)
            except Exception:  # noqa: BLE001 - it expires instead
                log.failure("Microsoft 365 outbox: could not withdraw this node's heartbeat (it expires)")
        try:
            n = await self.db.run_interaction("o365 outbox: give leases back", outbox_q.release_leases_txn, self.owner)
        except Exception:  # noqa: BLE001 - the database is going away too: the leases expire instead
            log.failure("Microsoft 365 outbox: could not give the leases back at shutdown (they expire)")
            return
        if n:
            log.info("Microsoft 365 outbox: stopped; {n} lease(s) given back for another node to take over", n=n)

    def wake(self) -> None:
        """Look for work now (called after COMMIT by the planner, and by the poll)."""
        if not self._running:
            return
        if self._draining:
            self._again = True
            return
        free = self.concurrency - len(self._inflight)
        if free <= 0 or (self._inflight and free < self.claim_batch):
            return      # _drain would claim nothing; the next delivery to end wakes it (_done)
        if self._scheduled is None or not self._scheduled.active():
            # (plain mypy reads Twisted's interface methods, declared without self, one argument short)
            self._scheduled = self.reactor.callLater(0, self._kick)  # type: ignore[arg-type]

    def _kick(self) -> None:
        self._scheduled = None
        defer.ensureDeferred(self._drain()).addErrback(lambda f: log.failure("outbox worker: drain failed", f))

    # -- claiming -------------------------------------------------------------------
    async def _connector_ready(self) -> bool:
        c = self.connector
        now = time.monotonic()
        if now < self._paused_until:
            return False
        if now - self._entry_state_at >= 2.0:
            st = await self.db.run_interaction("o365 connector state", lambda txn: read_status_txn(self.d, txn), write=False)
            self._entry_state = next(iter(st.get("o365ConnectorState") or ()), None)
            self._entry_state_at = now
        mem = getattr(c, "state", None)
        mem = getattr(mem, "value", mem)
        ready = self._entry_state == "active" and mem == "active" and getattr(c, "client", None) is not None
        if not ready and self._entry_state != mem and self._entry_state is not None:
            # Another process (the CLI) changed the connector: let ours look again (rate-limited).
            self._recheck()
        elif not ready and mem == "error":
            # Its last check failed (Microsoft 365 or its sign-in service unreachable: an outage at
            # the server's start, or one that a re-check after a refused delivery ran into).  Look
            # again soon, backing off (10 s, 20 s ... 2 min), rather than at the connector's periodic
            # check (5 min): that left the queue stalled for minutes after a short outage.
            if self._recheck(min_interval=self._error_recheck):
                self._error_recheck = min(self._error_recheck * 2, ERROR_RECHECK[1])
        if not ready and not self._waiting_logged:
            log.info("Microsoft 365 outbox: waiting for the connector (state {state})", state=self._entry_state or mem)
            self._waiting_logged = True
        if ready:
            self._waiting_logged = False
            self._error_recheck = ERROR_RECHECK[0]
        return ready

    def _recheck(self, min_interval: float = 15.0) -> bool:
        """Have the connector check again now, unless it did less than ``min_interval`` ago."""
        now = time.monotonic()
        if now - self._last_check < min_interval or not hasattr(self.connector, "check"):
            return False
        self._last_check = now
        self._entry_state_at = 0.0

        async def run() -> None:
            await self.connector.check()
            self._entry_state_at = 0.0
            self.wake()
        defer.ensureDeferred(run()).addErrback(lambda f: log.failure("connector re-check failed", f))
        return True

    async def _drain(self) -> None:
        if self._draining:
            self._again = True
            return
        self._draining = True
        try:
            while self._running:
                self._again = False
                free = self.concurrency - len(self._inflight)
                # Under load, claim users a few at a time rather than one per finished job:
                # every claim is a write transaction that LDAP writes wait behind (SQLite).
                if free <= 0 or (self._inflight and free < self.claim_batch) or not await self._connector_ready():
                    break
                d = self.d
                owner, lease, now, exclude = self.owner, self.lease_seconds, self.wall_time(), list(self._inflight)
                mono = time.monotonic()
                full = mono - self._full_claim_at >= self.full_claim_interval
                if full:
                    self._full_claim_at = mono
                jobs = await self.db.run_interaction("o365 outbox claim", _claim_txn, d, owner, now, lease, free, exclude,
                                                     full)
                if not self._running:
                    break              # stopped meanwhile: the shutdown gives these leases back
                for job in jobs:
                    self._inflight[job.entry_uuid] = job
                    dd = job.deferred = defer.ensureDeferred(self._process(job))
                    dd.addErrback(self._process_failed)
                    dd.addBoth(self._done, job.entry_uuid)
                if len(jobs) < free and not self._again:
                    if self.caught_up is not None:
                        self.caught_up()       # no more ready rows than free slots: only a wake brings work
                    break
        finally:
            self._draining = False
            self._notify_idle()

    def _process_failed(self, f: Failure) -> None:
        if not f.check(defer.CancelledError):      # cancelled at shutdown: the lease is given back
            log.failure("outbox worker: processing failed", f)

    def _done(self, _: object, entry_uuid: str) -> None:
        self._inflight.pop(entry_uuid, None)
        if self._running:
            self.wake()
        else:
            self._notify_idle()

    async def _renew(self) -> None:
        if self._inflight:
            users = list(self._inflight)
            until = self.wall_time() + self.lease_seconds
            await self.db.run_interaction("o365 outbox lease renewal", outbox_q.renew_leases_txn, self.owner, users, until)

    async def _heartbeat(self) -> None:
        """Several nodes: note that this one runs (and delivers), pace to our share of the write
        budget, and take over the users of nodes presumed dead.

        Graph's write budget is per app and tenant: n nodes delivering each at budget/n stay
        within it.  A node counts while its heartbeat keeps changing (judged by our wall_time: no
        skew issue); one that stopped or died drops out after ``node_ttl`` and the others speed
        up again.  A node that has just appeared paces at its share at once; the others follow
        within one ``heartbeat_interval``.  One whose heartbeat has not changed for
        ``node_timeout`` is presumed dead: see :meth:`_take_over`."""
        if not self._running:
            return
        mem = getattr(self.connector, "state", None)
        delivering = getattr(mem, "value", mem) == "active" and self._entry_state == "active"
        now = self.wall_time()
        owner = self.owner

        def beat(txn: Txn) -> tuple[str | None, dict[str, str]]:
            before = outbox_q.node_beat_txn(txn, owner)
            return before, outbox_q.heartbeat_txn(txn, owner, now, alive=True, delivering=delivering,
                                           forget_before=now - 3600.0)
        before, beats = await self.db.run_interaction("o365 worker heartbeat", beat)
        if self._my_beat is not None and before != self._my_beat:
            log.warn("Microsoft 365 outbox: the other nodes presumed this node dead (its heartbeat stopped "
                     "for longer than [office365] node_timeout ({t:g}s): frozen, or cut off from the database) "
                     "and took over the users it was delivering; what it finishes for them is discarded",
                     t=self.node_timeout)
        self._my_beat = beats.get(owner)
        mono = time.monotonic()
        # Stalled ourselves (a frozen VM, a starved process) since the last heartbeat: the others'
        # heartbeats may not have changed *as far as we saw* for a while, but that says nothing.
        # Judge nobody until we have watched for node_timeout again.
        stalled = self._beat_ok_at is not None and mono - self._beat_ok_at > self.node_timeout / 2
        self._beat_ok_at = mono
        seen: dict[str, tuple[str, float]] = {}
        for node, value in beats.items():
            prev = self._beats.get(node)
            seen[node] = prev if prev is not None and prev[0] == value and not stalled else (value, mono)
        self._beats = seen
        live = sum(1 for node, (value, at) in seen.items()
                   if outbox_q.beat_delivers(value) and (node == owner or mono - at <= self.node_ttl))
        live = max(1, live if delivering else live + 1)
        if live != self.live_nodes:
            log.info("Microsoft 365 outbox: {n} node(s) deliver; this one paces its Graph writes to 1/{n} "
                     "of the write budget", n=live)
        self.live_nodes = live
        pacer = self._pacer()
        if pacer is not None:
            pacer.set_share(1.0 / live)
        dead = [(node, value, mono - at) for node, (value, at) in seen.items()
                if node != owner and mono - at > self.node_timeout]
        for node, value, silent in dead:
            await self._take_over(node, value, silent)

    async def _take_over(self, node: str, value: str, silent: float) -> None:
        """``node``'s heartbeat has read ``value`` for ``silent`` seconds: presume it dead, release
        its leases (``take_over_txn``: compare-and-delete of its heartbeat, one transaction) and
        claim its users now.  Should it come back, its claims' fencing tokens no longer match."""
        n = await self.db.run_interaction("o365 outbox: take over a dead node's users", outbox_q.take_over_txn, node, value)
        self._beats.pop(node, None)
        if n is None:
            return                      # it beat meanwhile, or another node took over first
        if n:
            log.warn("Microsoft 365 outbox: node {node} presumed dead (its heartbeat has not changed for "
                     "{s:.0f}s); taking over the {n} user(s) it had claimed", node=node, s=silent, n=n)
            self.wake()
        else:
            log.info("Microsoft 365 outbox: node {node} has stopped (no heartbeat for {s:.0f}s); it held no "
                     "claims", node=node, s=silent)

    async def _depth(self) -> None:
        # Counted in a read transaction: the count scans the queue (10-15 ms at 20,000 rows), and
        # in the write transaction every LDAP write waited for it (SQLite has one writer).
        counts = await self.db.run_interaction("o365 queue count", outbox_q.queue_counts_txn, write=False)
        depth = str(counts[outbox_q.READY] + counts[outbox_q.HELD])
        now = self.wall_time()

        def run(txn: Txn) -> None:
            write_status_txn(self.d, txn, {"o365QueueDepth": [depth]})
            purge_kept_passwords_txn(txn, now)     # unbound users' passwords past unbound_password_ttl
        await self.db.run_interaction("o365 queue depth", run)

    # -- one user ---------------------------------------------------------------------
    async def _process(self, job: _Job) -> None:
        rows = job.rows
        if not rows:                 # only held rows (cannot happen: claims need a ready row)
            await self.db.run_interaction("o365 outbox release", outbox_q.release_leases_txn, self.owner, [job.entry_uuid])
            return
        ids = [r.id for r in rows]
        desired = DesiredUser.from_json(rows[-1].payload)
        secret_row = current_secret_row(rows)   # the newest queued password, unless a later change made it stale
        secret = secret_row.secret if secret_row is not None else None
        pushed_fp = None if secret_row is None else (
            desired if secret_row is rows[-1] else DesiredUser.from_json(secret_row.payload)).password_fp
        attempts = max(r.attempts for r in rows)
        try:
            payloads = [desired] if len(rows) == 1 else [DesiredUser.from_json(r.payload) for r in rows]
            # "bind" among the coalesced rows: the user became bound (again) in this batch.
            rebind = any(p.reason == "bind" for p in payloads)
            out = await self.graph.apply(desired, secret, job.entry, rebind=rebind, changed=known_changes(payloads),
                                         claimed=lambda txn: outbox_q.owns_lease_txn(txn, self.owner, job.head, job.gen))
        except ClaimLost:
            self._lease_lost(job, desired, "no account created")
            return
        except (AuthError, Unauthorized) as e:
            # The connector cannot sign in: everyone waits (nothing is dropped); the connector shows why.
            transient = isinstance(e, AuthError) and e.transient
            wait = self.retry.delay(attempts) if transient else 5.0
            self._paused_until = time.monotonic() + min(wait, 30.0)
            log.warn("Microsoft 365 outbox: sign-in problem ({code}); queued work waits", code=e.code or type(e).__name__)
            self._recheck(min_interval=5.0)
            await self._fail(job, ids, str(e), permanent=False, next_at=self.wall_time() + min(wait, 30.0))
            return
        except Transient as e:
            wait = self.retry.delay(attempts, e.retry_after)
            log.info("Microsoft 365: {upn}: {error}; retry in {wait:.0f}s", upn=desired.upn, error=str(e), wait=wait)
            await self._fail(job, ids, str(e), permanent=False, next_at=self.wall_time() + wait)
            return
        except (GraphError, PermanentError) as e:    # BadRequest, Forbidden, ObjectConflict, NotFound...
            await self._permanent(job, ids, desired, str(e))
            return
        except defer.CancelledError:
            raise                                    # shutdown: the rows stay as they are
        except Exception as e:  # noqa: BLE001  (network trouble below the Graph client, a bug: retry later)
            if isinstance(e, DecryptionError):
                await self._permanent(job, ids, desired, "the queued password cannot be decrypted (altered row, or "
                                      "[secrets] key_file changed?); set the password again")
                return
            log.failure("Microsoft 365: delivery for {upn} failed; will retry", upn=desired.upn)
            await self._fail(job, ids, f"{type(e).__name__}", permanent=False,
                             next_at=self.wall_time() + self.retry.delay(attempts))
            return
        def finish(txn: Txn) -> bool:
            if not outbox_q.owns_lease_txn(txn, self.owner, job.head, job.gen):
                return False
            record_outcome_txn(self.d, txn, job.entry_uuid, ids, desired, out, secret, pushed_fp, self.wall_time())
            return True
        if not await self._end("o365 outbox complete", finish):
            self._lease_lost(job, desired, out.what)
            return
        self.delivered += len(ids)
        log.info("Microsoft 365: {upn}: {what} ({n} change(s) in {ms:.0f} ms)", upn=desired.upn or desired.dn,
                 what=out.what, n=len(ids), ms=(time.monotonic() - job.started) * 1000)

    async def _end(self, desc: str, fn: Callable[[Txn], bool]) -> bool:
        """Run ``fn(txn)`` (a job's completion or failure) in a write transaction shared with
        the other jobs ending meanwhile: one COMMIT for many users under load (group commit),
        no added wait when idle (the first one goes at once; others gather while it runs)."""
        d: defer.Deferred[bool] = defer.Deferred()
        self._ends.append((desc, fn, d))
        if not self._ending:
            defer.ensureDeferred(self._end_loop()).addErrback(
                lambda f: log.failure("outbox worker: ending deliveries failed", f))
        return await d

    def _pacer(self) -> WritePacer | None:
        """The Graph client's write pacer (the connector makes a new client when it re-checks)."""
        return getattr(getattr(self.connector, "client", None), "pacer", None)

    def _paced(self) -> bool:
        pacer = self._pacer()
        return pacer is not None and pacer.backlogged()

    async def _end_loop(self) -> None:
        self._ending = True
        try:
            while self._ends:
                if self.end_gather > 0 and self._running and len(self._inflight) >= self.claim_batch and self._paced():
                    # A backlog at Graph's write budget: deliveries end one at a time, ~19 a
                    # second, each a write transaction the LDAP writer waits behind (SQLite has
                    # one write lock; ~1.3 ms a time, 2-3% of the LDAP writer's time measured).
                    # Gathered, they are a few a second; the pacer, not the slots, is the limit.
                    await task.deferLater(self.reactor, self.end_gather, lambda: None)
                batch, self._ends = self._ends, []
                if len(batch) == 1:
                    desc, fn, d = batch[0]
                    try:
                        result = await self.db.run_interaction(desc, fn)
                    except Exception as e:  # noqa: BLE001 - handed to the job
                        d.errback(e)
                        continue
                    d.callback(result)
                    continue

                def run_all(txn: Txn, batch: list[tuple[str, Callable[[Txn], bool], defer.Deferred[bool]]] = batch
                            ) -> list[bool]:
                    return [fn(txn) for _, fn, _ in batch]
                try:
                    results = await self.db.run_interaction(f"o365 outbox: {len(batch)} deliveries ended", run_all)
                except Exception:  # noqa: BLE001 - one of them failed: each on its own, so the others stand
                    for desc, fn, d in batch:
                        try:
                            r = await self.db.run_interaction(desc, fn)
                        except Exception as e:  # noqa: BLE001
                            d.errback(e)
                        else:
                            d.callback(r)
                    continue
                for (_, _, d), r in zip(batch, results, strict=True):
                    d.callback(r)
        finally:
            self._ending = False

    def _lease_lost(self, job: _Job, desired: DesiredUser, what: str) -> None:
        log.warn("Microsoft 365: {upn}: this node's claim on the user's changes is no longer its own: its lease "
                 "expired or this node was presumed dead, and another node has taken them over (this delivery "
                 "took {s:.0f}s, the lease is {lease:g}s, node_timeout {timeout:g}s); this node's result is "
                 "discarded, the rows and the user's status are left to it ({what})",
                 upn=desired.upn or desired.dn, s=time.monotonic() - job.started, lease=self.lease_seconds,
                 timeout=self.node_timeout, what=what or "not delivered")

    async def _fail(self, job: _Job, ids: list[int], error: str, *, permanent: bool, next_at: float) -> None:
        def run(txn: Txn) -> bool:
            if not outbox_q.owns_lease_txn(txn, self.owner, job.head, job.gen):
                return False
            outbox_q.fail_txn(txn, ids, error, permanent=permanent, next_attempt_at=next_at)
            return True
        if not await self._end("o365 outbox retry later", run):
            self._lease_lost(job, DesiredUser.from_json(job.rows[-1].payload), "")

    async def _permanent(self, job: _Job, ids: list[int], desired: DesiredUser, error: str) -> None:
        log.warn("Microsoft 365: {upn}: {error}; stopped until the user's next change "
                 "or `ldapsync o365 reconcile --retry-errors`", upn=desired.upn or desired.dn, error=error)

        def run(txn: Txn) -> bool:
            if not outbox_q.owns_lease_txn(txn, self.owner, job.head, job.gen):
                return False
            outbox_q.fail_txn(txn, ids, error, permanent=True)
            if not desired.deleted:
                write_user_status_txn(self.d, txn, job.entry_uuid, {
                    "o365SyncState": [SyncState.error.value], "o365LastError": [error[:1000]]})
            return True
        if not await self._end("o365 outbox error", run):
            self._lease_lost(job, desired, "")
