"""Failover and fencing of outbox claims, on real SQLite and PostgreSQL (``ldapsync/store/outbox.py``).

- every claim of a user's head row gives it a new fencing token (``lease_gen``), loaded with the
  rows; completing needs the owner *and* the token of the claim, so a claim taken over and later
  re-claimed under the same node id does not let the first claim's delivery complete;
- ``take_over_txn``: a node presumed dead (its heartbeat unchanged) loses its heartbeat and its
  leases in one transaction, only if the heartbeat still reads what the caller saw (a node that
  beat meanwhile keeps everything; of two nodes taking over at once, one does it).

End to end (two servers, kill -9 and SIGSTOP): ``tests/sync/test_multinode.py``.
"""

from __future__ import annotations

import pytest
from conftest import fresh_database  # type: ignore[import-not-found]

from ldapsync.store import outbox as q
from ldapsync.store.database import Database


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    with fresh_database(request.param, tmp_path) as database:
        yield database


def _queue(db: Database, *users: str) -> None:
    db.run_sync("queue", q.queue_rows_txn, [q.QueuedRow(u, 0.0, "update", "{}") for u in users])


def _claim(db: Database, owner: str, now: float = 1000.0) -> dict[str, list[q.OutboxRow]]:
    return dict(db.run_sync("claim", q.claim_and_load_txn, owner, now, 600.0, 10))


def _owns(db: Database, owner: str, head: int, gen: int | None) -> bool:
    return db.run_sync("owns", q.owns_lease_txn, owner, head, gen)


def test_each_claim_has_its_own_fencing_token(db):
    _queue(db, "u1", "u2")
    first = _claim(db, "node-a")
    assert sorted(first) == ["u1", "u2"]
    head, gen = first["u1"][0].id, first["u1"][0].lease_gen
    assert gen >= 1 and _owns(db, "node-a", head, gen)
    # node-a is presumed dead and its users released; the same node id claims them again (a new
    # process under the same id, or node-a itself once back): the old claim is fenced off.
    db.run_sync("beat", q.heartbeat_txn, "node-a", 1000.0, alive=True, forget_before=0.0)
    assert db.run_sync("take over", q.take_over_txn, "node-a", "1000.0") == 2
    assert not _owns(db, "node-a", head, gen)
    again = _claim(db, "node-a")
    assert again["u1"][0].id == head and again["u1"][0].lease_gen == gen + 1
    assert not _owns(db, "node-a", head, gen), "the first claim could still complete the re-claimed user"
    assert _owns(db, "node-a", head, gen + 1)
    assert not _owns(db, "node-b", head, gen + 1)


def test_take_over_only_while_the_heartbeat_is_unchanged(db):
    _queue(db, "u1", "u2", "u3")
    db.run_sync("beat", q.heartbeat_txn, "node-a", 1000.0, alive=True, forget_before=0.0)
    db.run_sync("beat", q.heartbeat_txn, "node-b", 1000.5, alive=True, forget_before=0.0, delivering=False)
    claimed = db.run_sync("claim", q.claim_users_txn, "node-a", 1000.0, 600.0, 2)
    assert len(claimed) == 2
    # node-a beat again after node-b last looked: it is alive, nothing is taken
    beats = db.run_sync("beat", q.heartbeat_txn, "node-a", 1003.0, alive=True, forget_before=0.0)
    assert q.beat_delivers(beats["node-a"]) and not q.beat_delivers(beats["node-b"])
    assert db.run_sync("take over", q.take_over_txn, "node-a", "1000.0") is None
    assert db.run_sync("owner", q.node_beat_txn, "node-a") == "1003.0"
    assert db.run_sync("nothing claimable", q.claim_users_txn, "node-b", 1001.0, 600.0, 10) == ["u3"]
    # its heartbeat then stops at 1003.0: taken over once, by one node
    assert db.run_sync("take over", q.take_over_txn, "node-a", "1003.0") == 2
    assert db.run_sync("take over again", q.take_over_txn, "node-a", "1003.0") is None
    assert db.run_sync("gone", q.node_beat_txn, "node-a") is None
    assert sorted(db.run_sync("claim", q.claim_users_txn, "node-b", 1002.0, 600.0, 10)) == sorted(claimed)
