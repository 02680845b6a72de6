"""The password-expiry warning scan (selfservice/service.py: due_warnings_txn), in-process on real
SQLite and PostgreSQL: the due list it computes on the pool thread is the one the directory's
own password state gives (the admin exempt, each password warned once)."""

from __future__ import annotations

import time

import pytest
from helpers import SUFFIX

from conftest import fresh_database  # type: ignore[import-not-found]
from ldapsync.config import AdminConfig, Config, DirectoryConfig, PasswordsConfig
from ldapsync.directory.facade import Directory
from ldapsync.directory.hooks import Origin
from ldapsync.directory.policy import format_time
from ldapsync.directory.writes import Write
from ldapsync.selfservice.service import due_warnings_txn
from ldapsync.store import entries as store

DAY = 86400.0


@pytest.fixture(params=["sqlite", "postgresql"])
def directory(request, tmp_path):
    with fresh_database(request.param, tmp_path, migrated=False) as db:
        cfg = Config(
            directory=DirectoryConfig(suffix=SUFFIX, database=db.url),
            admin=AdminConfig(password_file=str(tmp_path / "pw")),
            passwords=PasswordsConfig(hash_time_cost=1, hash_memory_kib=8192),
        )
        d = Directory(cfg, db, hooks=[])
        d.bootstrap_sync()
        yield d


def put(d: Directory, dn: str, attrs: dict[str, list[str]]) -> None:
    """Add ``dn`` (operational attributes such as pwdChangedTime stored as given)."""

    def run(txn):
        w = Write(d, txn, "cn=admin," + SUFFIX, "add", Origin.LDAP)
        dn_ = d.dn(dn)
        user = {k: v for k, v in attrs.items() if not k.startswith(("pwd", "ldapsync"))}
        a = d.convert_attrs([(k, [x.encode() for x in v]) for k, v in user.items()], for_add=True)
        a["structuralObjectClass"] = [d.schema.check_entry(a)]
        a.update({k: v for k, v in attrs.items() if k not in user})
        w.create(dn_, a, w.get(dn_.parent))
        return w.finish()

    d.db.run_sync("add", run)


def reference(d: Directory, now: float) -> list[tuple[str, float]]:
    """The due list as computed before (on the reactor, by the directory's password_state)."""
    out = []
    for e in d.db.run_sync("all", store.all_entries_txn, "", 100000, write=False):
        a = e.attrs
        if not a.get("userPassword") or not a.get("pwdChangedTime"):
            continue
        exp = d.password_state(a, e.dn).expires_at
        if exp is None or not (now < exp <= now + d.policy.expire_warning):
            continue
        if a.get("ldapsyncExpiryWarned", [None])[0] == a["pwdChangedTime"][0]:
            continue
        out.append((e.dn, exp))
    return out


def scan(d: Directory, now: float, limit: int) -> list[tuple[str, float]]:
    due, after, batches = [], "", 0
    while after is not None and batches < 1000:
        after, found = d.db.run_sync("scan", due_warnings_txn, after, limit, d.policy, now, d.admin_dn.norm, write=False)
        due.extend((dn, exp) for dn, _attrs, exp in found)
        batches += 1
    return due


@pytest.mark.parametrize("limit", [1, 3, 1000])
def test_due_list_matches_the_directory_password_state(directory, limit) -> None:
    d = directory
    now = time.time()
    max_age, warn = d.policy.max_age, d.policy.expire_warning
    assert max_age and warn
    due_change = format_time(now - max_age + warn / 2)       # expires within the warning window
    cases = {
        "due": {"pwdChangedTime": [due_change]},
        "warned": {"pwdChangedTime": [due_change], "ldapsyncExpiryWarned": [due_change]},
        "warned-before": {"pwdChangedTime": [due_change], "ldapsyncExpiryWarned": [format_time(now - 200 * DAY)]},
        "recent": {"pwdChangedTime": [format_time(now - DAY)]},
        "expired": {"pwdChangedTime": [format_time(now - max_age - DAY)]},
        "edge-not-yet": {"pwdChangedTime": [format_time(now - max_age + warn + 5)]},
        "never-changed": {},
        "no-password": {"pwdChangedTime": [due_change], "userPassword": None},
    }
    put(d, f"cn=admin2,{SUFFIX}", {"objectClass": ["person"], "cn": ["admin2"], "sn": ["x"],
                                   "userPassword": ["{SSHA}x"], "pwdChangedTime": [due_change]})
    for uid, extra in cases.items():
        attrs = {"objectClass": ["inetOrgPerson"], "uid": [uid], "cn": [uid], "sn": ["P"], "userPassword": ["{SSHA}x"]}
        attrs.update(extra)
        put(d, f"uid={uid},ou=people,{SUFFIX}", {k: v for k, v in attrs.items() if v is not None})

    # the admin: a due password, but exempt from expiry
    def stamp_admin(txn):
        w = Write(d, txn, "cn=admin," + SUFFIX, "modify", Origin.LDAP)
        st = w.get(d.admin_dn)
        w.set_operational(st, {"pwdChangedTime": [due_change], "userPassword": ["{SSHA}x"]})
        return w.finish()

    d.db.run_sync("admin", stamp_admin)
    admin = d.db.run_sync("get", store.get_entry_txn, d.admin_dn.norm, write=False)
    assert admin.attrs.get("pwdChangedTime") == [due_change] and admin.attrs.get("userPassword")

    want = reference(d, now)
    got = scan(d, now, limit)
    assert got == want
    assert sorted(dn.split(",")[0] for dn, _ in got) == ["cn=admin2", "uid=due", "uid=warned-before"]
