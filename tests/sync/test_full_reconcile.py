"""The full comparison and deleted users' account records, end to end (issue 14, engine items 2-3):
real server, fake tenant process, ldap-utils, SQLite and PostgreSQL.

- a deleted user's account re-enabled in the portal is blocked again: by the delta pass (the
  account record), by ``ldapsync o365 reconcile --full`` and by the server's own full pass every
  ``full_reconcile_interval``;
- the full pass also puts back what the delta pass never reads (``passwordPolicies``) and what
  changed before its last pass: a bound user's names and a portal block, an unbound user
  re-enabled;
- a second full pass with nothing drifted writes nothing to Graph;
- an account ldapsync created blocked (Microsoft 365 lacks the password) and someone enabled in
  the portal is blocked again; a linked one (soft match) waiting for the password keeps its state.
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

import pytest
from conftest import office365_config  # type: ignore[import-not-found]
from helpers import PEOPLE, unique, wait_for
from sync.test_worker import (  # type: ignore[import-not-found]
    DOMAIN,
    PASSWORD,
    entry,
    graph_requests,
    modify,
    outbox_rows,
    person,
    wait_entry_state,
    wait_tenant,
)

pytestmark = pytest.mark.e2e

NO_EXPIRY = "DisablePasswordExpiration"


def drained(srv) -> None:
    wait_for("outbox drained", lambda: not outbox_rows(srv), 30)


def records(srv) -> list[tuple[Any, ...]]:
    import sqlalchemy as sa

    eng = sa.create_engine(srv.db_url)
    try:
        with eng.connect() as c:
            return list(c.exec_driver_sql("SELECT entry_uuid, object_id, upn, state FROM o365_account_records").fetchall())
    finally:
        eng.dispose()


def setup_users(srv, fake) -> dict[str, Any]:
    """A deleted user (``gone``), an unbound one (``off``) and a bound one (``on``), all delivered,
    then edited in the portal: both blocked accounts re-enabled, the bound one renamed, its
    password expiry policy cleared and its sign-in blocked."""
    uids = {k: unique(f"f{k}") for k in ("gone", "off", "on")}
    upns = {k: f"{u}@{DOMAIN}" for k, u in uids.items()}
    for u in uids.values():
        srv.run("ldapadd", input=person(u, password=PASSWORD, bound=True), check=True)
    for u in uids.values():
        wait_entry_state(srv, u, "synced", timeout=30)
    oid_gone = wait_tenant(fake, upns["gone"])["id"]
    srv.run("ldapdelete", f"uid={uids['gone']},{PEOPLE}", check=True)
    modify(srv, uids["off"], "delete: ldapsyncDirectory\n", check=True)
    wait_entry_state(srv, uids["off"], "disabled", timeout=30)
    wait_tenant(fake, upns["gone"], lambda u: u["accountEnabled"] is False, timeout=30)
    drained(srv)
    fake.admin.portal_edit(key=upns["gone"], accountEnabled=True)
    fake.admin.portal_edit(key=upns["off"], accountEnabled=True)
    fake.admin.portal_edit(key=upns["on"], displayName="Portal Name", surname="Portal", passwordPolicies="None",
                           accountEnabled=False)
    return {"uids": uids, "upns": upns, "oid_gone": oid_gone}


def all_put_back(fake, s: dict[str, Any], timeout: float = 60) -> None:
    upns, uids = s["upns"], s["uids"]
    wait_tenant(fake, upns["gone"], lambda u: u["accountEnabled"] is False, timeout=timeout)
    wait_tenant(fake, upns["off"], lambda u: u["accountEnabled"] is False, timeout=timeout)
    on = wait_tenant(fake, upns["on"], lambda u: u["displayName"] == f"{uids['on'].capitalize()} Test"
                     and u["accountEnabled"] is True and NO_EXPIRY in (u.get("passwordPolicies") or ""), timeout=timeout)
    assert on["surname"] == "Test"
    assert fake.admin.get_user(key=upns["gone"]) is not None       # blocked, never deleted


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_reconcile_full_puts_back_deleted_unbound_and_bound_users(make_server, fake_tenant, backend):
    # No timed passes during the test: only the CLI's.
    srv = make_server(backend, office365_config(fake_tenant.info, reconcile_interval="1h", full_reconcile_interval="0"))
    wait_for("connector active", lambda: "active" in srv.cli("o365", "status").stdout.decode(), timeout=30)
    s = setup_users(srv, fake_tenant)
    # the deleted user's link was kept, in the delete's own transaction
    recs = {r[2].lower(): r for r in records(srv) if r[2]}
    assert recs[s["upns"]["gone"]][1] == s["oid_gone"].lower() and recs[s["upns"]["gone"]][3] == "deleted"
    assert recs[s["upns"]["off"]][3] == "unbound"

    p = srv.cli("o365", "reconcile", "--full")
    out = (p.stdout + p.stderr).decode(errors="replace")
    assert p.returncode == 0, out
    assert "full comparison" in out, out
    assert f"uid={s['uids']['gone']},{PEOPLE} (deleted; {s['upns']['gone']})" in out, out
    assert f"uid={s['uids']['on']},{PEOPLE}" in out, out
    all_put_back(fake_tenant, s)
    drained(srv)

    # nothing drifted any more: a second full pass queues nothing and writes nothing to Graph
    patches = len(graph_requests(fake_tenant, "PATCH"))
    p = srv.cli("o365", "reconcile", "--full")
    out = (p.stdout + p.stderr).decode(errors="replace")
    assert p.returncode == 0 and "drift" not in out, out
    assert not outbox_rows(srv)
    assert len(graph_requests(fake_tenant, "PATCH")) == patches


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_full_reconcile_runs_every_interval(make_server, fake_tenant, backend):
    # The delta pass is kept out of the way (1 h): only the timed full pass can put things back.
    srv = make_server(backend, office365_config(fake_tenant.info, reconcile_interval="1h", full_reconcile_interval="2s"))
    wait_for("connector active", lambda: "active" in srv.cli("o365", "status").stdout.decode(), timeout=30)
    s = setup_users(srv, fake_tenant)
    all_put_back(fake_tenant, s)
    status = srv.cli("o365", "status").stdout.decode()
    assert "last full comparison: 20" in status and "(every 2s;" in status, status
    assert "accounts kept blocked for users no longer bound: 1 unbound, 1 deleted from the directory" in status, status
    # and again later: the next pass (another interval on) finds and fixes a new edit
    fake_tenant.admin.portal_edit(key=s["upns"]["gone"], accountEnabled=True)
    wait_tenant(fake_tenant, s["upns"]["gone"], lambda u: u["accountEnabled"] is False, timeout=60)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_deleted_user_reenabled_is_blocked_by_the_delta_pass(make_server, fake_tenant, backend):
    srv = make_server(backend, office365_config(fake_tenant.info, reconcile_interval="2s", full_reconcile_interval="0"))
    wait_for("connector active", lambda: "active" in srv.cli("o365", "status").stdout.decode(), timeout=30)
    uid = unique("fd")
    upn = f"{uid}@{DOMAIN}"
    srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    wait_entry_state(srv, uid, "synced", timeout=30)
    srv.run("ldapdelete", f"uid={uid},{PEOPLE}", check=True)
    wait_tenant(fake_tenant, upn, lambda u: u["accountEnabled"] is False, timeout=30)
    drained(srv)
    fake_tenant.admin.portal_edit(key=upn, accountEnabled=True)
    wait_tenant(fake_tenant, upn, lambda u: u["accountEnabled"] is False, timeout=30)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_imported_never_bound_user_is_not_ours_to_block(make_server, fake_tenant, backend):
    """An imported user that was never bound: deleting its entry keeps no record, and neither pass
    touches its account (it was never ldapsync's); an imported user that was bound and then
    deleted is blocked and kept blocked."""
    srv = make_server(backend, office365_config(fake_tenant.info, reconcile_interval="1h", full_reconcile_interval="0"))
    wait_for("connector active", lambda: "active" in srv.cli("o365", "status").stdout.decode(), timeout=30)
    uids = {k: unique(f"fi{k}") for k in ("never", "once")}
    upns = {k: f"{u}@{DOMAIN}" for k, u in uids.items()}
    for k, u in uids.items():
        fake_tenant.admin.add_user(upn=upns[k], display_name=f"Imported {k}", mailNickname=u, mail=upns[k],
                                   givenName="Imported", surname=k)
        p = srv.cli("o365", "import", "--user", upns[k])
        assert p.returncode == 0, p.stdout + p.stderr
    modify(srv, uids["once"], "add: ldapsyncDirectory\nldapsyncDirectory: office365\n", check=True)
    wait_entry_state(srv, uids["once"], "synced", timeout=30)
    for u in uids.values():
        srv.run("ldapdelete", f"uid={u},{PEOPLE}", check=True)
    wait_tenant(fake_tenant, upns["once"], lambda u: u["accountEnabled"] is False, timeout=30)
    drained(srv)
    assert [r[3] for r in records(srv) if (r[2] or "").lower() == upns["once"]] == ["deleted"]
    assert not [r for r in records(srv) if (r[2] or "").lower() == upns["never"]]
    fake_tenant.admin.portal_edit(key=upns["once"], accountEnabled=True)
    patches = len(graph_requests(fake_tenant, "PATCH", fake_tenant.admin.get_user(key=upns["never"])["id"]))
    p = srv.cli("o365", "reconcile", "--full")
    assert p.returncode == 0, p.stdout + p.stderr
    wait_tenant(fake_tenant, upns["once"], lambda u: u["accountEnabled"] is False, timeout=30)
    drained(srv)
    assert fake_tenant.admin.get_user(key=upns["never"])["accountEnabled"] is True
    assert len(graph_requests(fake_tenant, "PATCH", fake_tenant.admin.get_user(key=upns["never"])["id"])) == patches


def test_two_nodes_share_the_full_reconcile(make_cluster, fake_tenant):
    """Two nodes on one PostgreSQL database, both with the timer: a deleted user's re-enabled
    account is blocked again, the passes take turns under the reconcile lease (no failed pass),
    and the time of the last one is shared in the database."""
    import sqlalchemy as sa

    a, b = make_cluster(2, office365_config(fake_tenant.info, reconcile_interval="1h", full_reconcile_interval="2s"))
    for n in (a, b):
        wait_for("connector active", lambda n=n: "active" in n.cli("o365", "status").stdout.decode(), timeout=30)
    uid = unique("f2")
    upn = f"{uid}@{DOMAIN}"
    a.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    wait_entry_state(a, uid, "synced", timeout=30)
    b.run("ldapdelete", f"uid={uid},{PEOPLE}", check=True)
    wait_tenant(fake_tenant, upn, lambda u: u["accountEnabled"] is False, timeout=30)
    drained(a)
    for _ in range(2):      # twice: whichever node's pass comes next puts it back each time
        fake_tenant.admin.portal_edit(key=upn, accountEnabled=True)
        wait_tenant(fake_tenant, upn, lambda u: u["accountEnabled"] is False, timeout=60)
    eng = sa.create_engine(a.db_url)
    try:
        with eng.connect() as c:
            last = c.exec_driver_sql("SELECT value FROM meta WHERE key = 'o365.full_reconcile_at'").scalar()
    finally:
        eng.dispose()
    assert last and float(last) > 0
    logs = [n.log.read_text(errors="replace") for n in (a, b)]
    assert sum(t.count("full reconcile:") for t in logs) >= 2
    for t in logs:
        assert "reconcile pass failed" not in t and "Traceback" not in t


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_users_unbound_by_deactivate_are_left_alone(make_server, fake_tenant, backend):
    """`o365 deactivate` leaves Microsoft 365 untouched, and so does the full pass after
    `reactivate`: a user that was unbound and bound again once (its record says bound), then
    unbound by deactivate, keeps its enabled account, also when its entry is deleted."""
    srv = make_server(backend, office365_config(fake_tenant.info, reconcile_interval="1h", full_reconcile_interval="0"))
    wait_for("connector active", lambda: "active" in srv.cli("o365", "status").stdout.decode(), timeout=30)
    uids = {k: unique(f"fx{k}") for k in ("kept", "deleted")}
    upns = {k: f"{u}@{DOMAIN}" for k, u in uids.items()}
    for u in uids.values():
        srv.run("ldapadd", input=person(u, password=PASSWORD, bound=True), check=True)
        wait_entry_state(srv, u, "synced", timeout=30)
        modify(srv, u, "delete: ldapsyncDirectory\n", check=True)
        wait_entry_state(srv, u, "disabled", timeout=30)
        modify(srv, u, "add: ldapsyncDirectory\nldapsyncDirectory: office365\n", check=True)
        wait_entry_state(srv, u, "synced", timeout=30)
    for upn in upns.values():
        wait_tenant(fake_tenant, upn, lambda u: u["accountEnabled"] is True, timeout=30)
    drained(srv)
    p = srv.cli("o365", "deactivate", "--yes")
    assert p.returncode == 0, p.stdout + p.stderr
    srv.run("ldapdelete", f"uid={uids['deleted']},{PEOPLE}", check=True)
    p = srv.cli("o365", "reactivate")
    assert p.returncode == 0, p.stdout + p.stderr
    wait_for("connector active", lambda: "active" in srv.cli("o365", "status").stdout.decode(), timeout=30)
    patches = len(graph_requests(fake_tenant, "PATCH"))
    p = srv.cli("o365", "reconcile", "--full")
    out = (p.stdout + p.stderr).decode(errors="replace")
    assert p.returncode == 0 and "drift" not in out, out
    assert not outbox_rows(srv)
    assert len(graph_requests(fake_tenant, "PATCH")) == patches
    for upn in upns.values():
        assert fake_tenant.admin.get_user(key=upn)["accountEnabled"] is True


def ssha(password: str) -> str:
    salt = os.urandom(8)
    return "{SSHA}" + base64.b64encode(hashlib.sha1(password.encode() + salt).digest() + salt).decode()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_account_waiting_for_its_password_is_blocked_again_linked_one_left(make_server, fake_tenant, backend):
    srv = make_server(backend, office365_config(fake_tenant.info, reconcile_interval="1h", full_reconcile_interval="0"))
    wait_for("connector active", lambda: "active" in srv.cli("o365", "status").stdout.decode(), timeout=30)
    uids = {k: unique(f"fp{k}") for k in ("created", "linked")}
    upns = {k: f"{u}@{DOMAIN}" for k, u in uids.items()}
    # an account that exists already (enabled), linked by soft match; the other one is created blocked
    fake_tenant.admin.add_user(upn=upns["linked"], display_name=f"{uids['linked'].capitalize()} Test",
                               mailNickname=uids["linked"], mail=upns["linked"], givenName=uids["linked"].capitalize(),
                               surname="Test")
    for u in uids.values():
        srv.run("ldapadd", input=person(u, password=ssha(PASSWORD), bound=True), check=True)   # only a hash
    for k, u in uids.items():
        e = wait_entry_state(srv, u, "synced", timeout=30)
        assert e.get("o365PasswordPending") == ["TRUE"], (k, e)
    assert wait_tenant(fake_tenant, upns["created"])["accountEnabled"] is False
    assert wait_tenant(fake_tenant, upns["linked"])["accountEnabled"] is True
    drained(srv)
    fake_tenant.admin.portal_edit(key=upns["created"], accountEnabled=True)
    linked_id = fake_tenant.admin.get_user(key=upns["linked"])["id"]
    patches = len(graph_requests(fake_tenant, "PATCH", linked_id))
    p = srv.cli("o365", "reconcile", "--full")
    out = (p.stdout + p.stderr).decode(errors="replace")
    assert p.returncode == 0, out
    assert f"uid={uids['created']},{PEOPLE}" in out and f"uid={uids['linked']}," not in out, out
    wait_tenant(fake_tenant, upns["created"], lambda u: u["accountEnabled"] is False, timeout=30)
    drained(srv)
    assert entry(srv, uids["created"]).get("o365PasswordPending") == ["TRUE"]
    assert fake_tenant.admin.get_user(key=upns["linked"])["accountEnabled"] is True
    assert len(graph_requests(fake_tenant, "PATCH", linked_id)) == patches
    # the user's own bind hands the password over: enabled, and the next pass leaves it so
    assert srv.run("ldapwhoami", bind=f"uid={uids['created']},{PEOPLE}", password=PASSWORD).returncode == 0
    wait_tenant(fake_tenant, upns["created"], lambda u: u["accountEnabled"] is True, timeout=30)
    drained(srv)
    p = srv.cli("o365", "reconcile", "--full")
    out = (p.stdout + p.stderr).decode(errors="replace")
    assert p.returncode == 0 and f"uid={uids['created']}," not in out, out
    assert fake_tenant.admin.get_user(key=upns["created"])["accountEnabled"] is True
