"""store/unbound_passwords.py on SQLite and PostgreSQL (migration 0006): one row per user, the
latest only; taken once and only before it expires; deleted; purged when its time is up."""

from __future__ import annotations

import pytest
from conftest import fresh_database  # type: ignore[import-not-found]

from ldapsync.store import unbound_passwords as kept


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    with fresh_database(request.param, tmp_path) as database:
        yield database


def test_only_the_latest_is_kept_and_taken_once(db):
    db.run_sync("put", kept.put_txn, "u1", "aa", 100.0, 200.0)
    db.run_sync("put", kept.put_txn, "u1", "bb", 110.0, 210.0)
    db.run_sync("put", kept.put_txn, "u2", "cc", 100.0, 200.0)
    assert db.run_sync("count", kept.count_txn) == 2
    assert db.run_sync("take", kept.take_txn, "u1", 150.0) == "bb"
    assert db.run_sync("take", kept.take_txn, "u1", 150.0) is None          # gone once taken
    db.run_sync("delete", kept.delete_txn, "u2")
    assert db.run_sync("count", kept.count_txn) == 0


def test_an_expired_one_is_never_handed_out_and_is_purged(db):
    db.run_sync("put", kept.put_txn, "u1", "aa", 100.0, 200.0)
    db.run_sync("put", kept.put_txn, "u2", "bb", 100.0, 300.0)
    assert db.run_sync("take", kept.take_txn, "u1", 200.0) is None          # its time is up
    db.run_sync("put", kept.put_txn, "u3", "cc", 100.0, 250.0)
    assert db.run_sync("purge", kept.purge_txn, 260.0) == 1
    assert db.run_sync("take", kept.take_txn, "u2", 260.0) == "bb"
