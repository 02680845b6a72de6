"""The directory and store in-process (no sockets): filters, scopes, index plans, writes.

Runs on real SQLite and real PostgreSQL.  Async directory calls run on a
private reactor thread-free path: ``Database.run_sync`` for writes via the
Write class, and the filter compiler directly.
"""

from __future__ import annotations

import pytest
from helpers import SUFFIX

from conftest import create_pg_database, drop_pg_database  # type: ignore[import-not-found]
from ldapsync.config import AdminConfig, Config, DirectoryConfig, PasswordsConfig
from ldapsync.directory import filters as F
from ldapsync.directory.errors import LDAPError, ResultCode
from ldapsync.directory.hooks import ChangeSet, Origin, WriteHooks
from ldapsync.directory.facade import Directory
from ldapsync.directory.writes import Write
from ldapsync.store import entries as store
from ldapsync.store.database import Database


@pytest.fixture
def hooks() -> list[WriteHooks]:
    """The directory's write hooks: a test that needs one adds it (the fixture is the wiring)."""
    return []


class Hook:
    """A write hook that calls ``fn(txn, changeset)``."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def on_change_txn(self, txn, cs: ChangeSet) -> None:
        self.fn(txn, cs)

    async def on_bind(self, dn, password: bytes) -> None:
        pass


@pytest.fixture(params=["sqlite", "postgresql"])
def directory(request, tmp_path, hooks):
    yield from _directory(request.param, tmp_path, hooks, nested_groups=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def nested_directory(request, tmp_path, hooks):
    yield from _directory(request.param, tmp_path, hooks, nested_groups=True)


def _directory(backend: str, tmp_path, hooks: list[WriteHooks], *, nested_groups: bool):
    pg = None
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'd.db'}"
    else:
        url, pg = create_pg_database()
    cfg = Config(
        directory=DirectoryConfig(suffix=SUFFIX, database=url, nested_groups=nested_groups),
        admin=AdminConfig(password_file=str(tmp_path / "pw")),
        passwords=PasswordsConfig(hash_time_cost=1, hash_memory_kib=8192),
    )
    db = Database(url)
    d = Directory(cfg, db, hooks=hooks)
    d.bootstrap_sync()
    yield d
    db.stop()
    if pg:
        drop_pg_database(pg)


def add(d: Directory, dn: str, **attrs: list[str] | str) -> None:
    norm = {k: (v if isinstance(v, list) else [v]) for k, v in attrs.items()}

    def run(txn):
        w = Write(d, txn, "cn=admin," + SUFFIX, "add", Origin.LDAP)
        dn_ = d.dn(dn)
        a = d.convert_attrs([(k, [x.encode() for x in v]) for k, v in norm.items()], for_add=True)
        a["structuralObjectClass"] = [d.schema.check_entry(a)]
        w.create(dn_, a, w.get(dn_.parent))
        return w.finish()

    return d.db.run_sync("add", run)


def person(d, uid, parent=f"ou=people,{SUFFIX}", **extra):
    add(d, f"uid={uid},{parent}", objectClass=["inetOrgPerson"], uid=uid, cn=f"{uid} Person", sn="Person", **extra)


def find(d: Directory, flt: F.Filter, base: str = SUFFIX, scope: str = "sub") -> set[str]:
    pred, plan = d.filters.compile(flt)
    b = d.dn(base)

    def run(txn):
        rows = store.search_candidates_txn(txn, scope=scope, base_norm=b.norm, base_path=b.path_key, plan=plan, after_id=0, limit=100000)
        return {e.dn for e in rows if pred(e.attrs) is True}

    return d.db.run_sync("find", run, write=False)


def test_equality_is_case_insensitive_and_indexed(directory):
    d = directory
    person(d, "alice", mail="Alice@Example.COM")
    assert find(d, F.Eq("mail", "alice@example.com")) == {f"uid=alice,ou=people,{SUFFIX}"}
    _, plan = d.filters.compile(F.Eq("mail", "ALICE@example.com"))
    assert plan == ("eq", "mail", "alice@example.com")
    # an unindexed attribute gives no plan but still matches
    person(d, "bob", title="Boss")
    pred, plan = d.filters.compile(F.Eq("title", "boss"))
    assert plan is None
    assert find(d, F.Eq("title", "BOSS")) == {f"uid=bob,ou=people,{SUFFIX}"}


def test_substring_presence_ordering_not(directory):
    d = directory
    for uid, n in (("carol", "100"), ("dave", "200"), ("erin", "300")):
        add(d, f"uid={uid},ou=people,{SUFFIX}", objectClass=["inetOrgPerson", "posixAccount"], uid=uid, cn=f"{uid} Smith",
            sn="Smith", uidNumber=n, gidNumber="1", homeDirectory=f"/home/{uid}")
    people = lambda *u: {f"uid={x},ou=people,{SUFFIX}" for x in u}  # noqa: E731
    assert find(d, F.Sub("cn", "car", (), None)) == people("carol")
    assert find(d, F.Sub("cn", None, ("VE SM",), None)) == people("dave")
    assert find(d, F.Sub("cn", None, (), "smith")) == people("carol", "dave", "erin")
    assert find(d, F.Ge("uidNumber", "200")) == people("dave", "erin")       # integer ordering, not text
    assert find(d, F.Le("uidNumber", "99")) == set()
    assert find(d, F.And((F.Present("uidNumber"), F.Not(F.Eq("uid", "dave"))))) == people("carol", "erin")
    assert find(d, F.Or((F.Eq("uid", "carol"), F.Eq("uid", "erin")))) == people("carol", "erin")
    # undefined attribute: the item is Undefined, NOT(Undefined) is still not True
    assert find(d, F.Not(F.Eq("noSuchAttr", "x"))) == set()
    # extensible match with a rule and dnAttributes-free form
    assert find(d, F.Ext("caseExactMatch", "sn", "smith", False)) == set()
    assert find(d, F.Ext("caseExactMatch", "sn", "Smith", False)) == people("carol", "dave", "erin")


def test_scope_is_sql_not_a_walk(directory):
    d = directory
    add(d, f"ou=a,ou=people,{SUFFIX}", objectClass=["organizationalUnit"], ou="a")
    add(d, f"ou=b,ou=a,ou=people,{SUFFIX}", objectClass=["organizationalUnit"], ou="b")
    person(d, "x1", parent=f"ou=a,ou=people,{SUFFIX}")
    person(d, "x2", parent=f"ou=b,ou=a,ou=people,{SUFFIX}")
    base = f"ou=a,ou=people,{SUFFIX}"
    allp = F.Present("objectClass")
    assert find(d, allp, base, "base") == {base}
    assert find(d, allp, base, "one") == {f"ou=b,{base}", f"uid=x1,{base}"}
    assert find(d, allp, base, "sub") == {base, f"ou=b,{base}", f"uid=x1,{base}", f"uid=x2,ou=b,{base}"}
    assert find(d, allp, base, "children") == {f"ou=b,{base}", f"uid=x1,{base}", f"uid=x2,ou=b,{base}"}
    # a sibling whose name starts with the same text is not inside the subtree
    add(d, f"ou=ab,ou=people,{SUFFIX}", objectClass=["organizationalUnit"], ou="ab")
    assert f"ou=ab,ou=people,{SUFFIX}" not in find(d, allp, base, "sub")


def test_write_is_one_transaction_with_memberof(directory):
    d = directory
    person(d, "m1")
    person(d, "m2")
    add(d, f"cn=g,ou=groups,{SUFFIX}", objectClass=["groupOfNames"], cn="g",
        member=[f"uid=m1,ou=people,{SUFFIX}", f"UID=M2,ou=People,{SUFFIX}"])
    got = d.db.run_sync("get", store.get_entries_txn, [d.dn(f"uid=m1,ou=people,{SUFFIX}").norm, d.dn(f"uid=m2,ou=people,{SUFFIX}").norm], write=False)
    assert all(e.attrs["memberOf"] == [f"cn=g,ou=groups,{SUFFIX}"] for e in got.values())
    assert find(d, F.Eq("memberOf", f"CN=G,OU=groups,{SUFFIX}")) == {f"uid=m1,ou=people,{SUFFIX}", f"uid=m2,ou=people,{SUFFIX}"}

    # a failing write leaves nothing behind: the group is added, then the txn fails
    def failing(txn):
        w = Write(d, txn, "cn=admin," + SUFFIX, "add", Origin.LDAP)
        dn_ = d.dn(f"cn=h,ou=groups,{SUFFIX}")
        a = {"objectClass": ["groupOfNames"], "cn": ["h"], "member": [f"uid=m1,ou=people,{SUFFIX}"]}
        w.create(dn_, a, w.get(dn_.parent))
        w.finish()
        raise LDAPError(ResultCode.other, "boom")

    with pytest.raises(LDAPError):
        d.db.run_sync("fail", failing)
    m1 = d.db.run_sync("get", store.get_entry_txn, d.dn(f"uid=m1,ou=people,{SUFFIX}").norm, write=False)
    assert m1.attrs["memberOf"] == [f"cn=g,ou=groups,{SUFFIX}"]
    assert find(d, F.Eq("cn", "h")) == set()


def test_change_hooks_run_in_the_write_transaction(directory, hooks):
    d = directory
    seen = []

    def hook(txn, cs):
        seen.append((cs.operation, cs.origin, [(c.kind, c.dn) for c in cs.changes]))
        if cs.operation == "refused":
            raise LDAPError(ResultCode.unwillingToPerform, "hook refused")

    hooks.append(Hook(hook))
    person(d, "hooked")
    assert seen[-1] == ("add", Origin.LDAP, [("add", f"uid=hooked,ou=people,{SUFFIX}")])

    def run(txn):
        w = Write(d, txn, "cn=admin," + SUFFIX, "refused", Origin.LDAP)
        st = w.require(d.dn(f"uid=hooked,ou=people,{SUFFIX}"))
        w.update(st, {**st.attrs, "sn": ["Changed"]})
        return w.finish()

    with pytest.raises(LDAPError):
        d.db.run_sync("m", run)
    e = d.db.run_sync("get", store.get_entry_txn, d.dn(f"uid=hooked,ou=people,{SUFFIX}").norm, write=False)
    assert e.attrs["sn"] == ["Person"]          # the hook's refusal rolled the change back


def _member_of_through_two_groups(d: Directory) -> list[str]:
    person(d, "n1")
    add(d, f"cn=inner,ou=groups,{SUFFIX}", objectClass=["groupOfNames"], cn="inner", member=f"uid=n1,ou=people,{SUFFIX}")
    add(d, f"cn=outer,ou=groups,{SUFFIX}", objectClass=["groupOfNames"], cn="outer", member=f"cn=inner,ou=groups,{SUFFIX}")
    e = d.db.run_sync("get", store.get_entry_txn, d.dn(f"uid=n1,ou=people,{SUFFIX}").norm, write=False)
    return sorted(e.attrs["memberOf"])


def test_nested_groups(nested_directory):
    assert _member_of_through_two_groups(nested_directory) == [f"cn=inner,ou=groups,{SUFFIX}", f"cn=outer,ou=groups,{SUFFIX}"]


def test_groups_are_not_nested_by_default(directory):
    assert _member_of_through_two_groups(directory) == [f"cn=inner,ou=groups,{SUFFIX}"]


def test_status_asked_by_hooks_is_stored_with_a_plain_modify(directory, hooks):
    """A plain modify is stored once, after the hooks, with the status values they asked for; a
    status on an indexed attribute takes the second flush, so its index rows are right too."""
    d = directory
    person(d, "stat")
    norm = d.dn(f"uid=stat,ou=people,{SUFFIX}").norm

    def hook(txn, cs):
        if cs.operation == "modify":
            for c in cs.changes:
                cs.request_status(c.dn_norm, {"o365SyncState": ["pending"], "o365ObjectId": ["obj-1"]})

    def modify(txn):
        w = Write(d, txn, "cn=admin," + SUFFIX, "modify", Origin.LDAP)
        st = w.require(d.dn(f"uid=stat,ou=people,{SUFFIX}"))
        w.update(st, {**st.attrs, "sn": ["Changed"]})
        return w.finish()

    hooks.append(Hook(hook))
    cs = d.db.run_sync("m", modify)
    hooks.clear()
    assert [c.kind for c in cs.changes] == ["modify"]
    e = d.db.run_sync("get", store.get_entry_txn, norm, write=False)
    assert e.attrs["sn"] == ["Changed"] and e.attrs["o365SyncState"] == ["pending"] and e.attrs["o365ObjectId"] == ["obj-1"]
    assert find(d, F.Eq("o365ObjectId", "obj-1")) == {f"uid=stat,ou=people,{SUFFIX}"}
    assert find(d, F.Eq("sn", "Changed")) >= {f"uid=stat,ou=people,{SUFFIX}"}

    # Only the non-indexed status: no second flush, and the value is there.
    def hook2(txn, cs):
        for c in cs.changes:
            cs.request_status(c.dn_norm, {"o365SyncState": None})

    hooks.append(Hook(hook2))
    d.db.run_sync("m", modify)
    e = d.db.run_sync("get", store.get_entry_txn, norm, write=False)
    assert "o365SyncState" not in e.attrs and e.attrs["o365ObjectId"] == ["obj-1"]


def test_entries_stored_with_their_parent_are_linked_and_migration_0009_repairs_old_ones(directory):
    """An OU and a user under it added in one write (as ``ldif load`` does) are linked to their
    parents; a database the older code wrote (every such ``parent_id`` NULL) is repaired by 0009,
    also under an RDN value holding an escaped comma."""
    from ldapsync.store.migrate import upgrade

    d = directory
    ou, user = f"ou=Sales\\, EMEA,{SUFFIX}", f"uid=zed,ou=Sales\\, EMEA,{SUFFIX}"

    def run(txn):
        w = Write(d, txn, "cn=admin," + SUFFIX, "add", Origin.LDAP)
        for dn, attrs in ((ou, {"objectClass": ["organizationalUnit"], "ou": ["Sales, EMEA"]}),
                          (user, {"objectClass": ["inetOrgPerson"], "uid": ["zed"], "cn": ["Zed"], "sn": ["Zed"]})):
            dn_ = d.dn(dn)
            attrs["structuralObjectClass"] = [d.schema.check_entry(attrs)]
            w.create(dn_, attrs, w.get(dn_.parent))
        return w.finish()

    d.db.run_sync("add", run)
    assert find(d, F.Present("objectClass"), base=ou, scope="one") == {str(d.dn(user))}
    assert {f"ou=people,{SUFFIX}", str(d.dn(ou))} <= find(d, F.Present("objectClass"), scope="one")

    def parents(txn):
        return dict(txn.rows("SELECT dn_norm, parent_id FROM entries"))

    linked = d.db.run_sync("parents", parents, write=False)
    assert sum(1 for p in linked.values() if p is None) == 1        # the suffix only
    d.db.run_sync("as the older code left it", lambda txn: (
        txn.run("UPDATE entries SET parent_id = NULL"),
        txn.run("UPDATE alembic_version SET version_num = '0008'")))
    upgrade(d.db.engine)
    assert d.db.run_sync("parents", parents, write=False) == linked
