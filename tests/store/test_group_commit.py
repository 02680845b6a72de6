"""SQLite group commit (store/group_commit.py) on real SQLite files: one COMMIT for the writes
queued together, each in its own savepoint; nothing acknowledged before its COMMIT."""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

import pytest
import pytest_twisted
from conftest import fresh_database  # type: ignore[import-not-found]
from twisted.python.failure import Failure

from ldapsync.store.database import StoreError
from ldapsync.store.group_commit import GroupWriter, Item

WRITER_THREAD = "PoolThread-ldapsync-sql-write-1"     # the writer's connection setup (busy_timeout 0)


class Boom(Exception):
    pass


@pytest.fixture
def db(tmp_path):
    with fresh_database("sqlite", tmp_path) as database:
        database.run_sync("tables", lambda txn: (
            txn.run("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)"),
            txn.run("CREATE TABLE parent (k INTEGER PRIMARY KEY)"),
            txn.run("CREATE TABLE child (k INTEGER PRIMARY KEY, "
                    "p INTEGER REFERENCES parent(k) DEFERRABLE INITIALLY DEFERRED)")))
        yield database


def committed(path) -> list[int]:
    """What another connection sees: only committed rows."""
    c = sqlite3.connect(path)
    try:
        return [r[0] for r in c.execute("SELECT k FROM t ORDER BY k")]
    finally:
        c.close()


def run_group(db, path, fns: list[Any]) -> tuple[GroupWriter, list[tuple[str, Any, list[int]]]]:
    """Queue ``fns`` as one group and run it on a thread named like the writer; each outcome is
    recorded with what another connection could see at the moment it was delivered."""
    delivered: list[tuple[str, Any, list[int]]] = []

    def deliver(fn: Any, outcome: Any) -> None:
        delivered.append(("error" if isinstance(outcome, Failure) else "ok", outcome, committed(path)))

    group = GroupWriter(db, lambda job: None, deliver)
    items = [Item(f"w{i}", fn, (), {}) for i, fn in enumerate(fns)]
    t = threading.Thread(target=group.run_group, args=(items,), name=WRITER_THREAD)
    t.start()
    t.join(60)
    assert not t.is_alive()
    return group, delivered


def insert(k: int):  # type: ignore[no-untyped-def]
    def fn(txn):  # type: ignore[no-untyped-def]
        txn.run("INSERT INTO t VALUES (?, 'x')", (k,))
        txn.call_after(print, "hook", k)
        return txn.rows("SELECT COUNT(*) FROM t")[0][0]
    return fn


def test_one_commit_for_the_group_and_a_failing_write_rolls_back_alone(db, tmp_path):
    def half(txn):  # type: ignore[no-untyped-def]
        txn.run("INSERT INTO t VALUES (20, 'x')")
        raise Boom("no")

    group, out = run_group(db, tmp_path / "d.db", [insert(1), half, insert(3), insert(1), insert(4)])
    assert group.groups == 1
    kinds = [k for k, _, _ in out]
    assert kinds == ["ok", "error", "ok", "error", "ok"]
    # each write saw the ones before it in the group, not the rolled-back one
    assert [o[0] for k, o, _ in out if k == "ok"] == [1, 2, 3]
    assert out[1][1].check(Boom)
    assert out[3][1].check(StoreError) and "UNIQUE" in str(out[3][1].value)
    # acknowledged only after the COMMIT: another connection already saw every committed row
    assert all(seen == [1, 3, 4] for _, _, seen in out)
    # the hooks of the writes that committed, none of the failed ones
    assert [o[1] for k, o, _ in out if k == "ok"] == [[(print, ("hook", 1))], [(print, ("hook", 3))],
                                                       [(print, ("hook", 4))]]


def test_a_failed_commit_fails_every_write_and_runs_none_again(db, tmp_path):
    calls: list[str] = []

    def orphan(txn):  # type: ignore[no-untyped-def]
        calls.append("orphan")
        txn.run("INSERT INTO child VALUES (1, 99)")    # a deferred foreign key: fails at COMMIT

    def counted(k: int):  # type: ignore[no-untyped-def]
        def fn(txn):  # type: ignore[no-untyped-def]
            calls.append(f"w{k}")
            return insert(k)(txn)
        return fn

    group, out = run_group(db, tmp_path / "d.db", [counted(1), orphan, counted(2)])
    assert [k for k, _, _ in out] == ["error", "error", "error"]
    assert all(o.check(StoreError) and "COMMIT" in str(o.value) for _, o, _ in out)
    assert calls == ["w1", "orphan", "w2"] and group.groups == 0
    assert committed(tmp_path / "d.db") == []
    # the writer's connection is usable again
    _, out = run_group(db, tmp_path / "d.db", [insert(5), insert(6)])
    assert [k for k, _, _ in out] == ["ok", "ok"] and committed(tmp_path / "d.db") == [5, 6]


@pytest_twisted.ensureDeferred
async def test_run_interaction_groups_concurrent_writes(db, tmp_path):
    """Through Database.run_interaction on the running reactor: 200 concurrent writes share
    COMMITs, every one lands, and each caller's hooks run after its own COMMIT."""
    from twisted.internet import defer

    db.start()
    seen: list[tuple[int, list[int]]] = []

    def hook(k: int) -> None:
        seen.append((k, committed(tmp_path / "d.db")))

    def write(k: int):  # type: ignore[no-untyped-def]
        def fn(txn):  # type: ignore[no-untyped-def]
            txn.run("INSERT INTO t VALUES (?, 'x')", (k,))
            txn.call_after(hook, k)
        return fn

    await defer.gatherResults([defer.ensureDeferred(db.run_interaction(f"w{k}", write(k))) for k in range(200)])
    assert committed(tmp_path / "d.db") == list(range(200))
    assert sorted(k for k, _ in seen) == list(range(200))
    assert all(k in rows for k, rows in seen)
    assert db._group is not None and db._group.groups >= 1
