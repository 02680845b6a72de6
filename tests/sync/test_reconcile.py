"""Drift and password capture, end to end: real server, fake tenant process, ldap-utils.

- someone edits a bound user in the portal → the reconciler puts the directory's values back
  (automatically every reconcile_interval, and at once with `ldapsync o365 reconcile`);
- someone re-enables an unbound (blocked) user → blocked again;
- an account deleted in Microsoft 365 → reported on the entry, not recreated;
- a user bound while the directory holds only a hash → created with sign-in blocked, and the
  password the user binds with next is pushed and the account enabled.
"""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
from conftest import office365_config  # type: ignore[import-not-found]
from helpers import PEOPLE, unique
from sync.test_worker import (  # type: ignore[import-not-found]
    DOMAIN,
    PASSWORD,
    TAG,
    entry,
    modify,
    person,
    tenant_user,
    wait_entry_state,
    wait_for,
    wait_tenant,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["sqlite", "postgresql"])
def env(request, make_server, fake_tenant):
    srv = make_server(request.param, office365_config(fake_tenant.info, reconcile_interval="2s"))
    wait_for("connector active", lambda: "active" in srv.cli("o365", "status").stdout.decode(), timeout=30)
    return srv, fake_tenant


def test_portal_edit_is_put_back(env):
    srv, fake = env
    uid = unique("r")
    upn = f"{uid}@{DOMAIN}"
    srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    wait_entry_state(srv, uid, "synced")
    fake.admin.portal_edit(key=upn, displayName="Changed In Portal", surname="Portal")
    # the server's own reconcile loop (every 2 s) fixes it
    u = wait_tenant(fake, upn, lambda u: u.get("displayName") == f"{uid.capitalize()} Test" and u.get("surname") == "Test",
                    timeout=30)
    assert u["accountEnabled"] is True
    # and the CLI runs a pass on demand
    fake.admin.portal_edit(key=upn, givenName="Someone")
    p = srv.cli("o365", "reconcile")
    assert p.returncode == 0, p.stdout + p.stderr
    wait_tenant(fake, upn, lambda u: u.get("givenName") == uid.capitalize(), timeout=30)


def test_reenabled_unbound_user_is_blocked_again(env):
    srv, fake = env
    uid = unique("r")
    upn = f"{uid}@{DOMAIN}"
    srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    wait_entry_state(srv, uid, "synced")
    modify(srv, uid, "delete: ldapsyncDirectory\n", check=True)
    wait_entry_state(srv, uid, "disabled")
    fake.admin.portal_edit(key=upn, accountEnabled=True)
    wait_tenant(fake, upn, lambda u: u.get("accountEnabled") is False, timeout=30)


def test_account_deleted_in_microsoft365_is_reported_not_recreated(env):
    srv, fake = env
    uid = unique("r")
    upn = f"{uid}@{DOMAIN}"
    srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    wait_entry_state(srv, uid, "synced")
    creates_before = len(fake.admin.requests(kind="graph", method="POST", path=r"^/v1\.0/users$"))
    fake.admin.delete_user(key=upn)
    e = wait_entry_state(srv, uid, "error", timeout=30)
    assert "deleted in Microsoft 365" in e["o365LastError"][0]
    assert tenant_user(fake, upn) is None
    assert len(fake.admin.requests(kind="graph", method="POST", path=r"^/v1\.0/users$")) == creates_before


def test_password_captured_at_next_bind(env):
    srv, fake = env
    uid = unique("c")
    upn = f"{uid}@{DOMAIN}"
    salt = os.urandom(8)
    ssha = "{SSHA}" + base64.b64encode(hashlib.sha1(PASSWORD.encode() + salt).digest() + salt).decode()
    srv.run("ldapadd", input=person(uid, password=ssha), check=True)      # loaded with only a hash
    srv.run("ldapmodify", input=f"dn: {TAG}\nchangetype: modify\nadd: member\nmember: uid={uid},{PEOPLE}\n", check=True)
    e = wait_entry_state(srv, uid, "synced")
    assert e.get("o365PasswordPending") == ["TRUE"]
    u = wait_tenant(fake, upn)
    assert u["accountEnabled"] is False and fake.admin.password_of(key=upn) != PASSWORD
    # the user's next successful bind hands the cleartext over
    assert srv.run("ldapwhoami", bind=f"uid={uid},{PEOPLE}", password=PASSWORD).returncode == 0
    wait_tenant(fake, upn, lambda u: u.get("accountEnabled") is True, timeout=15)
    assert fake.admin.password_of(key=upn) == PASSWORD
    assert "o365PasswordPending" not in wait_for("flag cleared", lambda: (lambda x: x if "o365PasswordPending" not in x else None)(entry(srv, uid)))
    assert PASSWORD not in srv.log.read_text()


def test_account_deleted_while_a_full_scan_ran_is_reported_in_the_next_pass(make_server, fake_tenant):
    """A full scan cannot judge a user linked while it ran (to the second): absent from the scan,
    it may be new or gone, and a deletion before the scan got there is never in a delta after it.
    Such users are looked up by id in the next pass."""
    import json
    import sqlite3

    srv = make_server("sqlite", office365_config(fake_tenant.info, reconcile_interval="3600s"))
    wait_for("connector active", lambda: "active" in srv.cli("o365", "status").stdout.decode(), timeout=30)
    uid = unique("r")
    upn = f"{uid}@{DOMAIN}"
    srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    wait_entry_state(srv, uid, "synced")
    # The state such a scan finds: the entry synced at (or after) the second the scan started.
    con = sqlite3.connect(srv.db_url[len("sqlite:///"):], timeout=30)
    with con:
        (eid, attrs), = con.execute("SELECT id, attrs FROM entries WHERE dn_norm LIKE ?", (f"uid={uid},%",))
        attrs = json.loads(attrs)
        assert "o365SyncedAt" in attrs, sorted(attrs)
        attrs["o365SyncedAt"] = ["29991231235959Z"]
        con.execute("UPDATE entries SET attrs = ? WHERE id = ?", (json.dumps(attrs), eid))
    con.close()
    fake_tenant.admin.delete_user(key=upn)
    p = srv.cli("o365", "reconcile")                      # the first pass: a full scan
    assert p.returncode == 0, p.stdout + p.stderr
    assert entry(srv, uid)["o365SyncState"] == ["synced"]   # not judged: it might be new
    p = srv.cli("o365", "reconcile")                      # a delta pass, which says nothing of it...
    assert p.returncode == 0, p.stdout + p.stderr
    e = entry(srv, uid)                                   # ...but the lookup by id does
    assert e["o365SyncState"] == ["error"] and "deleted in Microsoft 365" in e["o365LastError"][0]
    assert tenant_user(fake_tenant, upn) is None
