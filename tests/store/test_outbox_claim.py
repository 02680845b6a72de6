"""Claiming users from the Microsoft 365 outbox, on real SQLite and PostgreSQL: which users a
claim takes, and (PostgreSQL) that it walks the queue by index whatever the table's statistics."""

from __future__ import annotations

import json
import time

import pytest
from conftest import fresh_database  # type: ignore[import-not-found]

from ldapsync.store import outbox
from ldapsync.store.database import Database, Txn

INSERT = ("INSERT INTO o365_outbox (entry_uuid, created_at, operation, payload, state, next_attempt_at,"
          " lease_owner, lease_until) VALUES (?, 0, 'update', '{}', ?, ?, ?, ?)")


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    with fresh_database(request.param, tmp_path) as database:
        yield database


@pytest.fixture
def pg_db(tmp_path):
    with fresh_database("postgresql", tmp_path) as database:
        yield database


def _claim(db: Database, now: float, limit: int = 10, exclude: tuple[str, ...] = (), full: bool = True) -> list[str]:
    return db.run_sync("claim", lambda txn: outbox.claim_users_txn(txn, "me", now, 60.0, limit, exclude, full=full))


def _queue(db: Database, now: float) -> None:
    rows = [                       # (user, state, next_attempt_at, lease_owner, lease_until), ids in this order
        ("A", "ready", 0, None, None),
        ("B", "ready", 0, None, None),
        ("C", "ready", now + 30, None, None),       # backing off: not due
        ("A", "ready", 0, None, None),              # A's second row: not a head
        ("D", "ready", 0, "other", now + 60),       # another worker's lease
        ("E", "ready", 0, "gone", now - 1),         # a lease that expired: a crashed node's
        ("F", "held", 0, None, None),               # held head, a ready row after it
        ("F", "ready", 0, None, None),
        ("G", "held", 0, None, None),               # only held: waits for `ldapsync o365 release`
        ("H", "error", 0, None, None),              # stopped by a permanent error...
        ("H", "ready", 0, None, None),              # ... and changed since: tried again
        ("I", "error", 0, None, None),              # stopped, not changed since: stays
        ("J", "ready", now + 30, None, None),       # backing off...
        ("J", "ready", 0, None, None),              # ... and changed since: the new change is due
    ]
    db.run_sync("rows", lambda txn: txn.run_many(INSERT, rows))


def test_a_claim_takes_the_oldest_due_unleased_users_once(db):
    now = time.time()
    _queue(db, now)
    assert _claim(db, now, exclude=("B",)) == ["A", "E", "F", "H", "J"]
    leases = db.run_sync("leases", lambda txn: txn.rows(
        "SELECT entry_uuid, lease_owner FROM o365_outbox WHERE lease_owner IS NOT NULL ORDER BY id"), write=False)
    assert [tuple(r) for r in leases] == [("A", "me"), ("D", "other"), ("E", "me"), ("F", "me"), ("H", "me"),
                                          ("J", "me")]
    assert _claim(db, now) == ["B"]                 # no longer excluded; the others are leased now
    assert _claim(db, now) == []
    assert _claim(db, now + 31) == ["C"]            # its back-off is over (the leases are not)
    assert _claim(db, now, limit=0) == []


def test_the_fast_claim_takes_only_users_whose_oldest_row_is_ready_and_due(db):
    """The worker's usual claim: it does not look behind a head that is held, stopped by an error
    or backing off (the full claim, at least once a second, takes F, H and J)."""
    now = time.time()
    _queue(db, now)
    assert _claim(db, now, exclude=("B",), full=False) == ["A", "E"]
    assert _claim(db, now, full=False) == ["B"]
    assert _claim(db, now, full=False) == []
    assert _claim(db, now) == ["F", "H", "J"]
    assert _claim(db, now + 31, full=False) == ["C"]


def _plan_nodes(plan: dict) -> list[str]:
    out = [plan["Node Type"]]
    for sub in plan.get("Plans", []):
        out += _plan_nodes(sub)
    return out


def test_postgresql_claims_walk_the_queue_by_index_even_with_stale_statistics(pg_db):
    """The statistics of a queue table are usually from a moment it was (nearly) empty.  With
    them PostgreSQL turned the claim's EXISTS into a join: a scan of every ready row, a hash and
    a sort of all heads on each claim, 30 ms at 10,000 rows (0.7 ms by index), which held a
    single node's drain to ~340 changes/s.  The claim must walk the primary key in id order.
    (SQLite runs correlated EXISTS as written: it does not flatten them into joins.)"""
    db = pg_db
    now = time.time()

    def fill(txn: Txn) -> None:
        txn.run("ANALYZE o365_outbox")                                   # statistics of an empty queue
        users = [f"user-{i:05d}" for i in range(2000)]
        txn.run_many(INSERT, [(users[j % 2000], "ready", 0, None, None) for j in range(10000)])
        # a busy worker holds the 1,000 oldest users
        txn.run("UPDATE o365_outbox SET lease_owner = 'other', lease_until = ? WHERE id IN"
                " (SELECT MIN(id) FROM o365_outbox GROUP BY entry_uuid ORDER BY 1 LIMIT 1000)", (now + 60,))
    db.run_sync("fill", fill)

    def explain(txn: Txn, full: bool) -> list[str]:
        got = txn.rows("EXPLAIN (FORMAT JSON) " + outbox.claim_users_sql(True, full=full), [now, now, 16])[0][0]
        return _plan_nodes((json.loads(got) if isinstance(got, str) else got)[0]["Plan"])
    for full in (True, False):
        nodes = db.run_sync("explain", explain, full)
        assert not {"Seq Scan", "Hash", "Aggregate", "Sort", "Hash Join", "Merge Join"} & set(nodes), (full, nodes)
        assert nodes[:3] == ["Limit", "LockRows", "Index Scan"], (full, nodes)
    assert _claim(db, now, limit=8, full=False) == [f"user-{i:05d}" for i in range(1000, 1008)]
    assert _claim(db, now, limit=8) == [f"user-{i:05d}" for i in range(1008, 1016)]
