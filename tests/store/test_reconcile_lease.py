"""The reconcile lease (``ldapsync/store/reconcile_lease.py``), on real SQLite and PostgreSQL.

One pass at a time; a pass renews and gives back only its own lease; and a node that died holding
it does not keep the other passes out until it runs out (two minutes): its own worker frees it at
its next start, and the nodes that presume it dead free it with its outbox leases.  Found by the
randomized convergence test (PostgreSQL, seed 38): after a kill -9 mid-pass the restarted node
skipped every reconcile for two minutes.
"""

from __future__ import annotations

import pytest
from conftest import fresh_database  # type: ignore[import-not-found]

from ldapsync.store import outbox as q
from ldapsync.store import reconcile_lease as lease
from ldapsync.store.entries import get_meta_txn, set_meta_txn


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    with fresh_database(request.param, tmp_path) as database:
        yield database


def _take(db, pass_id: str, node: str | None, now: float = 1000.0) -> bool:
    return db.run_sync("take", lease.take_txn, pass_id, node, now, now + 120.0)


def test_one_pass_at_a_time_until_given_back_or_run_out(db):
    assert _take(db, "p1", "node-a")
    assert not _take(db, "p2", "node-b")
    assert not _take(db, "p3", "node-a"), "another pass on the same node must wait too"
    assert not db.run_sync("renew", lease.renew_txn, "p2", "node-b", 2000.0)
    assert db.run_sync("renew", lease.renew_txn, "p1", "node-a", 1500.0)
    assert not _take(db, "p2", "node-b", now=1400.0)
    db.run_sync("give back", lease.give_back_txn, "p2")                      # not its own: nothing
    assert not _take(db, "p2", "node-b")
    db.run_sync("give back", lease.give_back_txn, "p1")
    assert _take(db, "p2", "node-b")
    assert _take(db, "p4", None, now=1121.0), "a lease that ran out is taken over"
    assert db.run_sync("renew", lease.renew_txn, "p4", None, 2000.0)
    assert not db.run_sync("renew", lease.renew_txn, "p2", "node-b", 2000.0)


def test_a_restarted_node_frees_only_its_own_lease(db):
    assert _take(db, "p1", "node-a")
    assert not db.run_sync("release", lease.release_node_txn, "node-b")
    assert not db.run_sync("release", lease.release_node_txn, "")
    assert not _take(db, "p2", "node-b")
    assert db.run_sync("release", lease.release_node_txn, "node-a")
    assert _take(db, "p2", "node-b")
    # a lease written by an earlier version (a pass id alone) names no node: it runs out
    db.run_sync("old value", set_meta_txn, lease.META_LEASE, "0123abcd@5000.0")
    assert not db.run_sync("release", lease.release_node_txn, "node-a")
    assert not _take(db, "p3", "node-a", now=4000.0)
    assert _take(db, "p3", "node-a", now=5001.0)


def test_a_node_presumed_dead_gives_its_reconcile_lease_back(db):
    db.run_sync("beat", q.heartbeat_txn, "node-a", 1000.0, alive=True, forget_before=0.0)
    beats = db.run_sync("beat", q.heartbeat_txn, "node-b", 1000.0, alive=True, forget_before=0.0)
    assert _take(db, "p1", "node-a")
    assert db.run_sync("take over", q.take_over_txn, "node-a", beats["node-a"]) == 0
    assert db.run_sync("read", get_meta_txn, lease.META_LEASE, write=False) == ""
    assert _take(db, "p2", "node-b")
    # a second take-over finds the heartbeat gone: nothing is done, the new holder keeps the lease
    assert db.run_sync("take over", q.take_over_txn, "node-a", beats["node-a"]) is None
    assert not _take(db, "p3", "node-c")
