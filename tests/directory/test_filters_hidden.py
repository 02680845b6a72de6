"""The SQL candidate plan never reads what a filter may not see (issue 15, finding 1; README "Security").

In-process on real SQLite and PostgreSQL, with userPassword *configured* as
indexed (an operator's mistake): it is still never copied into the index, an
item on it plans to "no candidate" (so neither the answer nor the work done
depends on a password), NOT of it stays Undefined, and the big-OR plan groups
equality terms into IN lists that both databases answer.
"""

from __future__ import annotations

import pytest
from conftest import fresh_database  # type: ignore[import-not-found]
from helpers import SUFFIX

from ldapsync.config import AdminConfig, Config, DirectoryConfig, PasswordsConfig
from ldapsync.directory import filters as F
from ldapsync.directory.hooks import Origin
from ldapsync.directory.facade import HIDDEN_ATTRS, NON_ADMIN_HIDDEN, Directory
from ldapsync.directory.writes import Write
from ldapsync.store import entries as store

HASH = "{SSHA}c2FsdGVkc2FsdGVkc2FsdGVkc2FsdA=="


@pytest.fixture(params=["sqlite", "postgresql"])
def directory(request, tmp_path):
    with fresh_database(request.param, tmp_path, migrated=False) as db:
        indexed = DirectoryConfig().indexed + ("userPassword", "pwdChangedTime")
        cfg = Config(directory=DirectoryConfig(suffix=SUFFIX, database=str(db.engine.url), indexed=indexed),
                     admin=AdminConfig(password_file=str(tmp_path / "pw")),
                     passwords=PasswordsConfig(hash_time_cost=1, hash_memory_kib=8192))
        d = Directory(cfg, db)
        d.bootstrap_sync()

        def run(txn):
            w = Write(d, txn, "cn=admin," + SUFFIX, "add", Origin.LDAP)
            for uid in ("bob", "carl"):
                dn = d.dn(f"uid={uid},ou=people,{SUFFIX}")
                attrs = {"objectClass": ["inetOrgPerson"], "uid": [uid], "cn": [uid], "sn": ["T"],
                         "userPassword": [HASH], "pwdChangedTime": ["20260101000000Z"],
                         "structuralObjectClass": ["inetOrgPerson"]}
                w.create(dn, attrs, w.get(dn.parent))
            return w.finish()

        db.run_sync("add", run)
        yield d


def find(d: Directory, flt: F.Filter, hidden: frozenset[str]) -> tuple[set[str], object]:
    pred, plan = d.filters.compile(flt, hidden)
    b = d.dn(SUFFIX)

    def run(txn):
        rows = store.search_candidates_txn(txn, scope="sub", base_norm=b.norm, base_path=b.path_key, plan=plan,
                                           after_id=0, limit=100000)
        return {e.dn.split(",")[0] for e in rows if pred(e.attrs) is True}

    return d.db.run_sync("find", run, write=False), plan


def test_userpassword_is_never_indexed(directory):
    rows = directory.db.run_sync("index", lambda txn: txn.rows(
        "SELECT COUNT(*) FROM entry_index WHERE attr = 'userpassword'"), write=False)
    assert rows[0][0] == 0
    assert "userpassword" not in directory.indexed


@pytest.mark.parametrize("flt", [
    F.Sub("userPassword", "{SSHA}", (), None),
    F.Present("userPassword"),
    F.Eq("userPassword", HASH),
    F.Ge("userPassword", "{"),
    F.And((F.Eq("uid", "bob"), F.Sub("userPassword", "{", (), None))),
], ids=["prefix", "present", "equal", "ge", "and"])
def test_an_item_on_userpassword_selects_no_candidate(directory, flt):
    for hidden in (HIDDEN_ATTRS, NON_ADMIN_HIDDEN):
        got, plan = find(directory, flt, hidden)
        assert got == set() and plan == F.NOTHING


def test_not_of_a_hidden_item_stays_undefined(directory):
    flt = F.And((F.Eq("uid", "bob"), F.Not(F.Eq("userPassword", "x"))))
    assert find(directory, flt, HIDDEN_ATTRS)[0] == set()
    # the policy state is hidden from non-admins only
    flt = F.Not(F.Present("pwdChangedTime"))
    assert find(directory, flt, NON_ADMIN_HIDDEN)[0] == set()
    assert find(directory, F.Present("pwdChangedTime"), HIDDEN_ATTRS)[0] >= {"uid=bob", "uid=carl"}


def test_a_big_or_is_one_in_list_per_attribute(directory):
    items = tuple(F.Eq("uid", f"x{i}") for i in range(3000)) + (F.Eq("uid", "bob"), F.Eq("cn", "carl"))
    got, plan = find(directory, F.Or(items), HIDDEN_ATTRS)
    assert got == {"uid=bob", "uid=carl"}
    assert plan[0] == "or" and sorted(p[0] for p in plan[1]) == ["eq", "in"]


def test_a_deep_wide_filter_still_answers(directory):
    """30 levels of a 64-way OR of prefixes: flat, the SQL was thousands of terms deep."""
    inner: F.Filter = F.Eq("uid", "bob")
    for level in range(30):
        items = tuple(F.Sub("uid", f"p{level}x{i}", (), None) for i in range(63))
        inner = F.Or(items + (F.And((F.Sub("cn", "b", (), None), inner)),))
    assert find(directory, inner, HIDDEN_ATTRS)[0] == {"uid=bob"}
