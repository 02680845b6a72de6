"""SQL for the Microsoft 365 outbox (``o365_outbox``): queueing, claiming, loading, completing, failing.

SQL only: no Graph, no LDAP, no decryption.  The rows are planned by the
planner (``ldapsync/sync/planner.py``; the reconciler's drift rows too), written
by :func:`queue_rows_txn`, and drained by the worker (``ldapsync/sync/worker.py``).

The unit of work is a *user* (``entry_uuid``), never a single row: a user's
rows are delivered in order, coalesced, by one worker at a time.  Ownership of
a user is a lease on its *head* row (its oldest row, whatever its state)::

    claim_users_txn:   heads that are not leased (or whose lease expired) and whose
                       user has a 'ready' row that is due  ──▶  lease_owner/lease_until on the head,
                       lease_gen + 1 (the claim's fencing token)
                       (PostgreSQL: FOR UPDATE SKIP LOCKED, so two nodes never take one head);
                       the fast form (full=False) only heads that are ready and due themselves
    load_user_rows_txn: the user's rows up to the last one that is not 'held'
    owns_lease_txn:    before completing or failing, in the same transaction: does the head still
                       carry our owner and our claim's lease_gen? (a node that stalled past its lease,
                       or was presumed dead, must not touch rows another node has re-claimed)
    complete_txn:      DELETE those rows (their encrypted secrets go with them)
    fail_txn:          attempts+1, next_attempt_at, last_error  (transient)
                       or state='error'                         (permanent)
    release_lease_txn: give the head back without changing anything (connector not usable)
    heartbeat_txn:     each worker node's "I am running (and delivering)" in ``meta`` (PostgreSQL):
                       the nodes split Graph's write budget by how many of them deliver, and
    take_over_txn:     a node whose heartbeat stopped is presumed dead: its heartbeat is removed
                       and its leases released, in one transaction, so the others claim its users
                       within seconds instead of after ``outbox_lease``

Rows added while a user is being worked on have higher ids and stay: after
the claimed rows are deleted, the oldest of them is the new head and is due.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ldapsync.store import reconcile_lease
from ldapsync.store.database import Txn
from ldapsync.store.entries import get_meta_txn, set_meta_txn

READY = "ready"
HELD = "held"
ERROR = "error"
# PostgreSQL: a transaction that queued (or re-readied) rows notifies this channel; every
# node's listener (ldapsync/sync/notify.py) wakes its worker when the transaction commits.
NOTIFY_CHANNEL = "ldapsync_outbox"


@dataclass(frozen=True)
class OutboxRow:
    id: int
    entry_uuid: str
    created_at: float
    operation: str
    payload: str
    secret: str | None = None
    state: str = READY
    attempts: int = 0
    lease_gen: int = 0              # the head row's: the fencing token of the claim that loaded it

    def __repr__(self) -> str:        # never show the (encrypted) secret
        return (f"OutboxRow(id={self.id}, entry_uuid={self.entry_uuid!r}, operation={self.operation!r}, "
                f"state={self.state!r}, attempts={self.attempts}, secret={'<set>' if self.secret else None})")


_ROW_COLS = "id, entry_uuid, created_at, operation, payload, secret, state, attempts, lease_gen"


class QueuedRow(NamedTuple):
    """A row to queue (a tuple: the planner builds one per queued change, on the LDAP write's path)."""

    entry_uuid: str
    created_at: float
    operation: str                  # why: bind, update, password, unbind, delete, drift
    payload: str                    # the DesiredUser as JSON
    secret: str | None = None       # the encrypted password (hex), if any
    state: str = READY              # or HELD by the mass-disable guard

    def __repr__(self) -> str:        # never show the (encrypted) secret
        return (f"QueuedRow(entry_uuid={self.entry_uuid!r}, operation={self.operation!r}, state={self.state!r}, "
                f"secret={'<set>' if self.secret else None})")


def queue_rows_txn(txn: Txn, rows: Sequence[QueuedRow]) -> None:
    """Add ``rows`` to the queue, due now, in one statement.  The caller also calls
    :func:`notify_txn` and wakes its worker after COMMIT (``txn.call_after``)."""
    if rows:
        txn.run_many("INSERT INTO o365_outbox (entry_uuid, created_at, operation, payload, secret, state, "
                     "attempts, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [(*r, 0, 0.0) for r in rows])


def queue_covers_txn(txn: Txn, entry_uuid: str) -> bool:
    """Whether the user's queued rows already answer for drift the reconciler (or the expiry
    sweep) found, so it queues nothing: a ready row no worker has taken yet (that delivery will
    read the account afresh), or a row held for an admin by the mass-disable guard (an admin
    decides with ``ldapsync o365 release``: a drift row would be delivered with the held one and
    bypass the guard).

    A delivery in flight (its head row leased) may have read the account before the drift the
    reconciler saw: it does not count, or a portal edit made between its read and its write
    would be left for the next full pass (the delta link has moved past it)."""
    return bool(txn.rows(
        f"SELECT 1 FROM o365_outbox WHERE entry_uuid = ? AND (state = '{HELD}' OR (state = 'ready' AND NOT EXISTS"
        " (SELECT 1 FROM o365_outbox WHERE entry_uuid = ? AND lease_owner IS NOT NULL))) LIMIT 1",
        (entry_uuid, entry_uuid)))


def has_rows_txn(txn: Txn, entry_uuid: str) -> bool:
    """Whether the user has a row in the outbox (queued, held or being delivered)."""
    return bool(txn.rows("SELECT 1 FROM o365_outbox WHERE entry_uuid = ? LIMIT 1", (entry_uuid,)))


def _in(n: int) -> str:
    return "(" + ",".join("?" * n) + ")"


def claim_users_sql(is_postgres: bool, excluded: int = 0, *, full: bool = True) -> str:
    """The claim's SELECT: parameters now, now, *excluded, limit.

    It walks the queue in id order, stopping at ``limit`` heads (a user's oldest row) that are
    not leased.  ``full``: heads whose user has any ready row that is due, two index probes per
    row walked.  Not ``full`` (the *fast* claim): heads that are themselves ready and due, one
    probe, and only for rows that pass that test on their own columns; it passes over users
    parked behind a head stopped by an error or held by the guard (thousands of them made each
    full claim walk and probe every one: 4 ms per 5,000 on SQLite, 17 ms on PostgreSQL) and over
    users backing off whose newer change is due.  The worker runs a full claim at least once a
    second (``OutboxWorker.full_claim_interval``), so those wait at most that long.

    On PostgreSQL the subqueries end in ``OFFSET 0``, which keeps the planner from turning them
    into joins: a queue table's statistics are usually from a moment it was nearly empty, and
    with them the planner read every ready row, hashed them and sorted the heads on each claim
    (30 ms at 10,000 rows: the database's CPU bounded a single node's drain to ~340 changes/s).
    With the fence the plan is the index walk whatever the statistics say."""
    fence = " OFFSET 0" if is_postgres else ""         # SQLite neither needs nor parses OFFSET without LIMIT
    skip = f" AND h.entry_uuid NOT IN {_in(excluded)}" if excluded else ""
    lock = " FOR UPDATE OF h SKIP LOCKED" if is_postgres else ""
    head = f" AND NOT EXISTS (SELECT 1 FROM o365_outbox p WHERE p.entry_uuid = h.entry_uuid AND p.id < h.id{fence})"
    if full:           # after the head test: it fails first for the rows that are not heads
        before, after = "", (" AND EXISTS (SELECT 1 FROM o365_outbox r WHERE r.entry_uuid = h.entry_uuid"
                             f" AND r.state = 'ready' AND r.next_attempt_at <= ?{fence})")
    else:              # before it: the row's own columns, no probe
        # "NOT IN (held, error)" is "= ready" (a row is in one of the three states), but PostgreSQL
        # without fresh statistics guesses that few rows are "= ready", and then scanned the whole
        # table and sorted it; "<>" it guesses true for nearly every row, and walks the index.
        before, after = f" AND h.state NOT IN ('{HELD}', '{ERROR}') AND h.next_attempt_at <= ?", ""
    return ("SELECT h.id, h.entry_uuid FROM o365_outbox h WHERE (h.lease_until IS NULL OR h.lease_until < ?)"
            f"{before}{head}{after}{skip} ORDER BY h.id LIMIT ?{lock}")


def claim_users_txn(txn: Txn, owner: str, now: float, lease_seconds: float, limit: int,
                    exclude: Sequence[str] = (), *, full: bool = True) -> list[str]:
    """Lease up to ``limit`` users with due work; return their entry UUIDs (oldest work first).

    Each claimed head's ``lease_gen`` goes up by one: the claim's fencing token, which
    :func:`load_user_rows_txn` reads back with the rows and :func:`owns_lease_txn` checks.
    ``full=False``: only users whose oldest row is itself ready and due (see :func:`claim_users_sql`)."""
    if limit <= 0:
        return []
    rows = txn.rows(claim_users_sql(txn.is_postgres, len(exclude), full=full), [now, now, *exclude, limit])
    if not rows:
        return []
    ids = [r[0] for r in rows]
    txn.run("UPDATE o365_outbox SET lease_owner = ?, lease_until = ?, lease_gen = lease_gen + 1"
            f" WHERE id IN {_in(len(ids))}",
            [owner, now + lease_seconds, *ids])
    return [r[1] for r in rows]


def load_user_rows_txn(txn: Txn, entry_uuid: str) -> list[OutboxRow]:
    """The user's rows to deliver now: oldest first, up to the last row that is not held."""
    rows = [OutboxRow(*r) for r in txn.rows(
        f"SELECT {_ROW_COLS} FROM o365_outbox WHERE entry_uuid = ? ORDER BY id", (entry_uuid,))]
    last = max((i for i, r in enumerate(rows) if r.state != HELD), default=-1)
    return rows[:last + 1]


def claim_and_load_txn(txn: Txn, owner: str, now: float, lease_seconds: float, limit: int,
                       exclude: Sequence[str] = (), *, full: bool = True) -> list[tuple[str, list[OutboxRow]]]:
    """:func:`claim_users_txn` and :func:`load_user_rows_txn` in one transaction."""
    out = []
    for uuid in claim_users_txn(txn, owner, now, lease_seconds, limit, exclude, full=full):
        out.append((uuid, load_user_rows_txn(txn, uuid)))
    return out


def renew_leases_txn(txn: Txn, owner: str, entry_uuids: Sequence[str], until: float) -> None:
    """Extend this worker's leases on users it is still working on."""
    for i in range(0, len(entry_uuids), 500):
        part = list(entry_uuids[i:i + 500])
        txn.run(f"UPDATE o365_outbox SET lease_until = ? WHERE lease_owner = ? AND entry_uuid IN {_in(len(part))}",
                [until, owner, *part])


def release_leases_txn(txn: Txn, owner: str, entry_uuids: Sequence[str] | None = None) -> int:
    """Drop this owner's leases (all of them, e.g. at start after a crash, or those of some users)."""
    if entry_uuids is None:
        cur = txn.run("UPDATE o365_outbox SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?", (owner,))
        return int(cur.rowcount or 0)
    n = 0
    for i in range(0, len(entry_uuids), 500):
        part = list(entry_uuids[i:i + 500])
        cur = txn.run("UPDATE o365_outbox SET lease_owner = NULL, lease_until = NULL"
                      f" WHERE lease_owner = ? AND entry_uuid IN {_in(len(part))}", [owner, *part])
        n += int(cur.rowcount or 0)
    return n


def release_all_leases_txn(txn: Txn) -> int:
    """Single-node (SQLite) start: no other process can hold a lease, so every lease is stale."""
    cur = txn.run("UPDATE o365_outbox SET lease_owner = NULL, lease_until = NULL WHERE lease_owner IS NOT NULL")
    return int(cur.rowcount or 0)


def owns_lease_txn(txn: Txn, owner: str, head_id: int, gen: int | None = None) -> bool:
    """Whether ``owner`` still holds the lease on this user's head row from its claim ``gen``.

    A worker that stalled past its lease, or was presumed dead by the others (its heartbeat
    stopped), may find the user re-claimed by another node, given back, re-claimed under
    the same node id by a new claim (a higher ``lease_gen``), or delivered and deleted:
    then it must neither complete nor fail the rows nor write the user's status.
    PostgreSQL: the head row stays locked until COMMIT, so a claim or a take-over cannot
    slip in between this check and the caller's DELETE/UPDATE (one in progress holds the
    lock first, and this waits for it, then sees the new owner)."""
    lock = " FOR UPDATE" if txn.is_postgres else ""
    rows = txn.rows(f"SELECT lease_owner, lease_gen FROM o365_outbox WHERE id = ?{lock}", (head_id,))
    return bool(rows) and rows[0][0] == owner and (gen is None or int(rows[0][1]) == gen)


def complete_txn(txn: Txn, ids: Sequence[int]) -> None:
    """The rows were delivered: delete them, and with them their encrypted secrets."""
    for i in range(0, len(ids), 500):
        part = list(ids[i:i + 500])
        txn.run(f"DELETE FROM o365_outbox WHERE id IN {_in(len(part))}", part)


def fail_txn(txn: Txn, ids: Sequence[int], error: str, *, permanent: bool, next_attempt_at: float = 0.0) -> None:
    """Record a failed delivery: retry later (transient) or stop until the next change (permanent).

    Either way the lease is dropped.  ``error`` must not contain secrets (Graph never echoes them).
    """
    state = ERROR if permanent else READY
    for i in range(0, len(ids), 500):
        part = list(ids[i:i + 500])
        txn.run("UPDATE o365_outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?,"
                " state = CASE WHEN state = 'held' THEN 'held' ELSE ? END, lease_owner = NULL, lease_until = NULL"
                f" WHERE id IN {_in(len(part))}", [next_attempt_at, error[:2000], state, *part])


def set_object_id_in_later_rows_txn(txn: Txn, entry_uuid: str, after_id: int, object_id: str) -> None:
    """Later rows of a user written before its account id was known get it (e.g. a delete row)."""
    for rid, payload in txn.rows("SELECT id, payload FROM o365_outbox WHERE entry_uuid = ? AND id > ?",
                                 (entry_uuid, after_id)):
        try:
            data = json.loads(payload)
        except ValueError:
            continue
        if not data.get("object_id"):
            data["object_id"] = object_id
            txn.run("UPDATE o365_outbox SET payload = ? WHERE id = ?",
                    (json.dumps(data, separators=(",", ":"), sort_keys=True), rid))


def release_held_txn(txn: Txn) -> int:
    """``ldapsync o365 release``: held rows (the mass-disable guard) become ready now."""
    cur = txn.run("UPDATE o365_outbox SET state = 'ready', next_attempt_at = 0 WHERE state = 'held'")
    n = int(cur.rowcount or 0)
    if n:
        notify_txn(txn)            # the CLI's transaction: the servers' workers wake at COMMIT
    return n


def retry_errors_txn(txn: Txn) -> int:
    """``ldapsync o365 reconcile --retry-errors``: rows stopped by a permanent error are tried again."""
    cur = txn.run("UPDATE o365_outbox SET state = 'ready', attempts = 0, next_attempt_at = 0, last_error = NULL"
                  " WHERE state = 'error'")
    n = int(cur.rowcount or 0)
    if n:
        notify_txn(txn)
    return n


def notify_txn(txn: Txn) -> None:
    """PostgreSQL: wake the workers of every node once this transaction commits (no-op on SQLite).

    NOTIFY is transactional: nothing is sent on rollback, and several in one transaction are one."""
    if txn.is_postgres:
        txn.run(f"NOTIFY {NOTIFY_CHANNEL}")


def queue_counts_txn(txn: Txn) -> dict[str, int]:
    """Rows per state (ready, held, error)."""
    out = {READY: 0, HELD: 0, ERROR: 0}
    for state, n in txn.rows("SELECT state, COUNT(*) FROM o365_outbox GROUP BY state"):
        out[state] = int(n)
    return out


# -- creates in flight ------------------------------------------------------------------------
# A POST /users whose reply is lost (connection reset, node killed) still made the account.  The
# worker records that it is about to create a user, and the UPN it creates it with, before sending,
# so that the retry knows the account it then finds is its own (it already has the password the
# create carried, noted like a password PATCH) and not somebody else's to link to, even when the
# user's mail (its UPN) changed or it was unbound or deleted before the retry.

def _create_key(entry_uuid: str) -> str:
    return f"o365.create_sent.{entry_uuid}"


def mark_create_sent_txn(txn: Txn, entry_uuid: str, upn: str, password_note: str | None = None) -> None:
    """About to send a create with ``upn`` (and the password whose note is ``password_note``)."""
    set_meta_txn(txn, _create_key(entry_uuid), upn)
    if password_note is not None:
        set_meta_txn(txn, _password_key(entry_uuid), password_note)


def create_sent_upn_txn(txn: Txn, entry_uuid: str) -> str | None:
    """The UPN of a create sent for the user whose reply never came; "" when the create was noted
    by an earlier version, which wrote "1" and no UPN; None when none is pending."""
    value = get_meta_txn(txn, _create_key(entry_uuid))
    if not value:
        return None
    return "" if value == "1" else value


def create_was_sent_txn(txn: Txn, entry_uuid: str) -> bool:
    return create_sent_upn_txn(txn, entry_uuid) is not None


def clear_create_sent_txn(txn: Txn, entry_uuid: str) -> None:
    txn.run("DELETE FROM meta WHERE key = ?", (_create_key(entry_uuid),))


# A password PATCH in flight, noted before it is sent: Graph refuses to set the password an account
# already has, so the retry of a PATCH whose reply was lost after Graph applied it (a reset
# connection, a node killed) is refused; the note tells the retry that the password went out
# before (ldapsync/sync/graph_mapping.py).  Deleted with the user's delivered rows.

def _password_key(entry_uuid: str) -> str:
    return f"o365.password_sent.{entry_uuid}"


def note_password_sent_txn(txn: Txn, entry_uuid: str, note: str) -> bool:
    """Note that the password ``note`` (a digest of its sealed value) is being sent for the user;
    True when that same password was noted before (an earlier try of it went out)."""
    key = _password_key(entry_uuid)
    if get_meta_txn(txn, key) == note:
        return True
    set_meta_txn(txn, key, note)
    return False


def clear_password_sent_txn(txn: Txn, entry_uuid: str) -> None:
    txn.run("DELETE FROM meta WHERE key = ?", (_password_key(entry_uuid),))


def _pushed_key(entry_uuid: str) -> str:
    return f"o365.password_pushed.{entry_uuid}"


def note_password_pushed_txn(txn: Txn, entry_uuid: str, fingerprint: str) -> None:
    """Microsoft 365 now holds the password whose stored hashes have this fingerprint
    (``sync/password_plan.py`` ``password_fingerprint``; never the password)."""
    set_meta_txn(txn, _pushed_key(entry_uuid), fingerprint)


def password_pushed_txn(txn: Txn, entry_uuid: str) -> str | None:
    return get_meta_txn(txn, _pushed_key(entry_uuid))


# -- worker nodes: liveness, the shared write budget, failover ---------------------------------------
# Each running worker node (PostgreSQL) notes a heartbeat in ``meta`` (key prefix below, value its
# wall time, followed by " idle" while its connector is not active) every few seconds.  Graph's write
# budget is per app and tenant, so the nodes that deliver pace themselves to budget / (delivering
# nodes).  A node whose heartbeat has stopped changing for ``[office365] node_timeout`` is presumed
# dead (kill -9, power loss, a frozen VM) and the others take its claimed users over
# (:func:`take_over_txn`); the fencing token (``lease_gen``) keeps it from completing them should
# it come back.  Liveness is judged by the reader (the value changed lately, by its own wall time), so
# clock skew between machines does not matter.

NODE_KEY_PREFIX = "o365.node."
_IDLE = " idle"


def beat_delivers(value: str) -> bool:
    """Whether a heartbeat value (from :func:`heartbeat_txn`) says that its node delivers."""
    return not value.endswith(_IDLE)


def node_beat_txn(txn: Txn, owner: str) -> str | None:
    """This node's heartbeat value as the database has it (None: never written, withdrawn, or
    removed by another node that presumed this one dead)."""
    return get_meta_txn(txn, NODE_KEY_PREFIX + owner)


def heartbeat_txn(txn: Txn, owner: str, now: float, *, alive: bool, forget_before: float,
                  delivering: bool = True) -> dict[str, str]:
    """Note (``alive``; ``delivering`` or idle) or withdraw this node's heartbeat; return every
    node's heartbeat value (use :func:`beat_delivers` on it).

    Heartbeats older than ``forget_before`` (by their writer's wall time: a node gone for long) are
    deleted."""

    key = NODE_KEY_PREFIX + owner
    if alive:
        set_meta_txn(txn, key, repr(float(now)) + ("" if delivering else _IDLE))
    else:
        txn.run("DELETE FROM meta WHERE key = ?", (key,))
    out: dict[str, str] = {}
    stale = []
    for k, v in txn.rows("SELECT key, value FROM meta WHERE key LIKE ?", (NODE_KEY_PREFIX + "%",)):
        try:
            old = float(v.split()[0]) < forget_before
        except (ValueError, IndexError):
            old = True
        if old and k != key:
            stale.append(k)
        else:
            out[k[len(NODE_KEY_PREFIX):]] = v
    for k in stale:
        txn.run("DELETE FROM meta WHERE key = ?", (k,))
    return out


def take_over_txn(txn: Txn, node: str, value: str) -> int | None:
    """Presume ``node`` dead: its heartbeat still reads ``value``, unchanged for too long.

    Compare and delete: the heartbeat is removed only if it still reads ``value`` (a node that
    beat meanwhile is alive after all; of several nodes presuming it dead at once, one does
    it), and then every lease it holds is released, in the same transaction, and the workers
    are woken (NOTIFY) to claim those users; a reconcile lease it holds is given back too.  Returns the number of users released, or None
    when the heartbeat had changed or was gone (nothing done).  Should the node come back,
    its claims' ``lease_gen`` no longer match (:func:`owns_lease_txn`): what it finishes for
    those users is discarded, and its next heartbeat notices it was presumed dead.

    PostgreSQL: a node frozen in the middle of a transaction keeps that transaction's row locks
    until it resumes (or its connection ends).  Rows locked so are skipped, never waited for
    (``SKIP LOCKED``): a head row it locked to complete or fail its rows (:func:`owns_lease_txn`
    passed, so that outcome is its to write when it resumes), and its heartbeat row if it froze
    while beating; then the heartbeat stays, the leases are released all the same (the value has
    not changed for the whole timeout: as dead as can be), and a later look may try again."""
    if txn.is_postgres:
        rows = txn.rows("SELECT value FROM meta WHERE key = ? FOR UPDATE SKIP LOCKED", (NODE_KEY_PREFIX + node,))
        if not rows:
            rows = txn.rows("SELECT value FROM meta WHERE key = ?", (NODE_KEY_PREFIX + node,))
            if not rows or rows[0][0] != value:
                return None           # gone, or locked by a heartbeat that is being written now
        elif rows[0][0] != value:
            return None
        else:
            txn.run("DELETE FROM meta WHERE key = ?", (NODE_KEY_PREFIX + node,))
        cur = txn.run("UPDATE o365_outbox SET lease_owner = NULL, lease_until = NULL WHERE id IN"
                      " (SELECT id FROM o365_outbox WHERE lease_owner = ? FOR UPDATE SKIP LOCKED)", (node,))
        n = int(cur.rowcount or 0)
    else:
        cur = txn.run("DELETE FROM meta WHERE key = ? AND value = ?", (NODE_KEY_PREFIX + node, value))
        if not cur.rowcount:
            return None
        n = release_leases_txn(txn, node)
    reconcile_lease.release_node_txn(txn, node)       # a pass it was running ends with it
    if n:
        notify_txn(txn)
    return n


def held_users_txn(txn: Txn) -> set[str]:
    """The entryUUIDs of the users with a change held by the mass-disable guard."""
    return {r[0] for r in txn.rows("SELECT DISTINCT entry_uuid FROM o365_outbox WHERE state = 'held'")}
