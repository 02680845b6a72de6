"""search_candidates_txn: the SQL of filter plans selects the same entries whether the attribute
names are bound parameters or (SQLite) literals in the statement text.

Real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import pytest
from conftest import fresh_database  # type: ignore[import-not-found]

from ldapsync.store import entries as store
from ldapsync.store.entries import EntryChange

PEOPLE = [("alice", "staff", "alice@example.com"), ("bob", "staff", "bob@example.com"),
          ("carol", "guest", "carol@example.org"), ("dan_x", "guest", "dan%x@example.org")]
PLANS = [
    ("eq", "uid", "bob"),
    ("eq", "entryuuid", "uuid-carol"),
    ("in", "uid", ["alice", "carol", "nobody"]),
    ("present", "mail"),
    ("prefix", "mail", "bob"),
    ("prefix", "mail", ""),
    ("like", "mail", store.like_pattern(None, ["%x"], None)),
    ("and", [("eq", "employeetype", "guest"), ("prefix", "uid", "c")]),
    ("or", [("eq", "uid", "alice"), ("eq", "employeetype", "guest")]),
    ("and", [("eq", "uid", "alice"), ("none",)]),
    ("eq", "attr'; drop table entries; --", "x"),      # never a literal: a parameter
]


def _load(txn) -> None:
    changes = []
    for i, (uid, kind, mail) in enumerate(PEOPLE):
        attrs = {"uid": [uid], "employeeType": [kind], "mail": [mail], "entryUUID": [f"uuid-{uid}"]}
        changes.append(EntryChange("add", f"uid={uid},dc=x", f"uid={uid},dc=x", f"dc=x,uid={uid},", None, attrs,
                                   index_add={("uid", uid), ("employeetype", kind), ("mail", mail),
                                              ("entryuuid", f"uuid-{uid}")}))
    store.write_changes_txn(txn, changes)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_plans_select_the_same_entries_with_literal_or_bound_attribute_names(backend, tmp_path, monkeypatch):
    with fresh_database(backend, tmp_path) as db:
        db.run_sync("load", _load)

        def run(txn, plan):
            return [e.dn for e in store.search_candidates_txn(txn, scope="sub", base_norm="dc=x", base_path="dc=x,",
                                                              plan=plan, after_id=0, limit=100)]

        got = {repr(p): db.run_sync("search", run, p, write=False) for p in PLANS}
        sql: list[str] = []
        real = store._plan_sql
        monkeypatch.setattr(store, "_plan_sql", lambda plan, params, literal=False: sql.append(
            text := real(plan, params, False)) or text)
        bound = {repr(p): db.run_sync("search", run, p, write=False) for p in PLANS}
        assert got == bound
        assert all("attr = '" not in s for s in sql)
    assert got[repr(PLANS[0])] == ["uid=bob,dc=x"]
    assert got[repr(PLANS[2])] == ["uid=alice,dc=x", "uid=carol,dc=x"]
    assert got[repr(PLANS[6])] == ["uid=dan_x,dc=x"]
    assert got[repr(PLANS[7])] == ["uid=carol,dc=x"]
    assert got[repr(PLANS[8])] == ["uid=alice,dc=x", "uid=carol,dc=x", "uid=dan_x,dc=x"]
    assert got[repr(PLANS[9])] == [] and got[repr(PLANS[10])] == []


def test_sqlite_statement_names_safe_attributes_as_literals():
    params: list = []
    sql = store._plan_sql(("and", [("eq", "uid", "bob"), ("eq", "x'y", "z"), ("present", "mail")]), params, True)
    assert "attr = 'uid'" in sql and "attr = 'mail'" in sql and "x'y" not in sql
    assert params == ["bob", "x'y", "z"]
