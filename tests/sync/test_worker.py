"""The outbox worker end to end: a real server (twistd), ldap-utils, the fake tenant process, real MSAL/Graph.

Also its operational edges (private servers): kill -9 and restart, outages, the mass-disable guard and
`o365 release`, `soft_match = false`, `unbind_action = "block"`, `o365 reconcile --retry-errors`.

One server and one fake tenant per backend (SQLite, PostgreSQL) for the whole module; each test
works on its own users.  Mail addresses are on the tenant's verified domain contoso.com.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import _make_server, drop_pg_database, office365_config  # type: ignore[import-not-found]
from helpers import PEOPLE, SUFFIX, parse_ldif_output, ssha, unique, wait_for

pytestmark = pytest.mark.e2e
CONNECTOR = f"cn=office365,ou=directories,{SUFFIX}"
TAG = f"cn=Provisioning - Office 365,ou=tags,{SUFFIX}"
DOMAIN = "contoso.com"
PASSWORD = "Corr3ct-Horse-Battery!"


# -- helpers ------------------------------------------------------------------------------

def person(uid: str, *, password: str | None = None, bound: bool = False, mail: str | None = None,
           extra: str = "") -> str:
    text = (f"dn: uid={uid},{PEOPLE}\nobjectClass: inetOrgPerson\nobjectClass: ldapsyncUser\nuid: {uid}\n"
            f"cn: {uid.capitalize()} Test\nsn: Test\ngivenName: {uid.capitalize()}\nmail: {mail or uid + '@' + DOMAIN}\n")
    if password:
        text += f"userPassword: {password}\n"
    if bound:
        text += "ldapsyncDirectory: office365\n"
    return text + extra + "\n"


def entry(srv, uid: str) -> dict[str, list[str]]:
    dn = f"uid={uid},{PEOPLE}"
    p = srv.run("ldapsearch", "-LLL", "-b", dn, "-s", "base", "(objectClass=*)", "*", "+")
    assert p.returncode == 0, p.stderr
    return parse_ldif_output(p.stdout)[dn]


def wait_entry_state(srv, uid: str, state: str, timeout: float = 15.0) -> dict[str, list[str]]:
    def check() -> dict[str, list[str]] | None:
        e = entry(srv, uid)
        return e if e.get("o365SyncState") == [state] else None
    return wait_for(f"o365SyncState {state} on {uid}", check, timeout)


def tenant_user(fake, upn: str) -> dict[str, Any] | None:
    return fake.admin.get_user(key=upn)


def wait_tenant(fake, upn: str, pred: Callable[[dict[str, Any]], bool] = lambda u: True,
                timeout: float = 15.0) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        u = tenant_user(fake, upn)
        return u if u is not None and pred(u) else None
    return wait_for(f"tenant user {upn}", check, timeout)


def modify(srv, uid: str, ldif: str, **kw: Any):
    return srv.run("ldapmodify", input=f"dn: uid={uid},{PEOPLE}\nchangetype: modify\n{ldif}", **kw)


def tag(srv, uid: str, op: str = "add") -> None:
    srv.run("ldapmodify", input=f"dn: {TAG}\nchangetype: modify\n{op}: member\nmember: uid={uid},{PEOPLE}\n", check=True)


def graph_requests(fake, method: str | None = None, path: str | None = None) -> list[dict[str, Any]]:
    return fake.admin.requests(kind="graph", method=method, path=path)


def wait_active(srv, timeout: float = 30.0) -> None:
    def active() -> bool:
        p = srv.run("ldapsearch", "-LLL", "-b", CONNECTOR, "-s", "base", "(objectClass=*)", "o365ConnectorState")
        return p.returncode == 0 and "o365ConnectorState: active" in p.stdout
    wait_for("connector active", active, timeout, 0.2)


def outbox_rows(srv) -> list[tuple[Any, ...]]:
    import sqlalchemy as sa

    eng = sa.create_engine(srv.db_url)
    try:
        with eng.connect() as c:
            return list(c.exec_driver_sql("SELECT id, entry_uuid, operation, state, attempts, last_error, secret"
                                          " FROM o365_outbox ORDER BY id").fetchall())
    finally:
        eng.dispose()


def outbox_payloads(srv, entry_uuid: str) -> list[str]:
    """The queued payloads (JSON text) of one user's outbox rows, straight from SQL."""
    import sqlalchemy as sa

    eng = sa.create_engine(srv.db_url)
    try:
        with eng.connect() as c:
            return [r[0] for r in c.exec_driver_sql("SELECT payload FROM o365_outbox WHERE entry_uuid = ? ORDER BY id"
                                                    if srv.db_url.startswith("sqlite") else
                                                    "SELECT payload FROM o365_outbox WHERE entry_uuid = %s ORDER BY id",
                                                    (entry_uuid,)).fetchall()]
    finally:
        eng.dispose()


def later_change_delivered(srv, fake) -> None:
    """A positive event to wait for before asserting that something did NOT happen: a user added
    now is delivered only after the worker has passed over what was queued before it."""
    uid = unique("mark")
    srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    wait_tenant(fake, f"{uid}@{DOMAIN}", timeout=30)
    wait_entry_state(srv, uid, "synced", timeout=30)


# -- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tenant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from ldapsync.testing.client import FakeTenantProcess

    proc = FakeTenantProcess(tmp_path_factory.mktemp("tenant"))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def srv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tls_files, tenant) -> Iterator[Any]:
    s, pg = _make_server(tmp_path_factory.mktemp(f"worker-{request.param}"), request.param, tls_files,
                         office365_config(tenant.info, usage_location="DE"))
    s.start()
    try:
        wait_active(s)
        yield s
    finally:
        s.stop()
        if pg:
            drop_pg_database(pg)


@pytest.fixture(autouse=True)
def _no_faults(tenant) -> Iterator[None]:
    yield
    tenant.admin.clear_faults()
    tenant.admin.end_outage()


# -- tests --------------------------------------------------------------------------------

def test_direct_bind_with_password_creates_the_account(srv, tenant):
    uid = unique()
    upn = f"{uid}@{DOMAIN}"
    srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    u = wait_tenant(tenant, upn)
    assert u["mail"] == upn and u["mailNickname"] == uid
    assert u["displayName"] == f"{uid.capitalize()} Test" and u["givenName"] == uid.capitalize() and u["surname"] == "Test"
    assert u["passwordPolicies"] == "DisablePasswordExpiration"
    assert u["usageLocation"] == "DE"
    assert u["accountEnabled"] is True
    assert u["passwordProfile"]["forceChangePasswordNextSignIn"] is False
    assert tenant.admin.password_of(key=upn) == PASSWORD
    e = wait_entry_state(srv, uid, "synced")
    assert e["o365ObjectId"] == [u["id"]] and e["o365SyncedAt"] and "o365LastError" not in e
    # the delivered row is gone, with its secret
    assert wait_for("outbox empty", lambda: not [r for r in outbox_rows(srv) if r[3] != "error"], 30)
    assert PASSWORD not in srv.log.read_text()


def test_tag_bind_without_password_then_updates_password_unbind_rebind(srv, tenant):
    uid = unique()
    upn = f"{uid}@{DOMAIN}"
    # Only a hash (a cleartext set while unbound would be kept for unbound_password_ttl and pushed
    # at the bind: tests/sync/test_unbound_passwords.py)
    srv.run("ldapadd", input=person(uid, password=ssha(PASSWORD)), check=True)   # unbound: nothing queued
    assert outbox_payloads(srv, entry(srv, uid)["entryUUID"][0]) == []
    later_change_delivered(srv, tenant)
    assert tenant_user(tenant, upn) is None
    # bound through the tag: the directory holds only a hash → created with sign-in blocked
    tag(srv, uid)
    u = wait_tenant(tenant, upn)
    assert u["accountEnabled"] is False
    assert tenant.admin.password_of(key=upn) != PASSWORD
    oid = wait_entry_state(srv, uid, "synced")["o365ObjectId"][0]
    assert oid == u["id"]

    # password modify (ldappasswd) → passwordProfile, no forced change, account enabled
    new_pw = "An0ther-Secret-Pass!"
    p = srv.run("ldappasswd", "-s", new_pw, f"uid={uid},{PEOPLE}")
    assert p.returncode == 0, p.stderr
    wait_for("password pushed", lambda: tenant.admin.password_of(key=upn) == new_pw)
    u = wait_tenant(tenant, upn, lambda u: u["accountEnabled"] is True)
    assert u["passwordProfile"]["forceChangePasswordNextSignIn"] is False

    # names → PATCH of the names only, without reading the account first (it was synced)
    wait_entry_state(srv, uid, "synced")
    n_before, n_get = len(graph_requests(tenant, "PATCH")), len(graph_requests(tenant, "GET", oid))
    modify(srv, uid, "replace: givenName\ngivenName: Renamed\n-\nreplace: sn\nsn: Person\n-\n"
                     "replace: displayName\ndisplayName: Renamed Person\n", check=True)
    u = wait_tenant(tenant, upn, lambda u: u["displayName"] == "Renamed Person")
    assert u["givenName"] == "Renamed" and u["surname"] == "Person"
    patches = graph_requests(tenant, "PATCH")[n_before:]
    assert len(patches) == 1 and set(patches[0]["body"]) == {"givenName", "surname", "displayName"}
    assert len(graph_requests(tenant, "GET", oid)) == n_get
    wait_entry_state(srv, uid, "synced")

    # mail local part → UPN + mail
    upn2 = f"{uid}.new@{DOMAIN}"
    modify(srv, uid, f"replace: mail\nmail: {upn2}\n", check=True)
    u = wait_tenant(tenant, upn2)
    assert u["id"] == oid and u["mail"] == upn2
    # mail domain → another verified domain
    upn3 = f"{uid}@contoso.onmicrosoft.com"
    modify(srv, uid, f"replace: mail\nmail: {upn3}\n", check=True)
    u = wait_tenant(tenant, upn3)
    assert u["id"] == oid and u["mail"] == upn3
    # an unverified domain is refused at the LDAP layer and nothing is queued
    n_rows, n_patch = len(outbox_rows(srv)), len(graph_requests(tenant, "PATCH"))
    p = modify(srv, uid, "replace: mail\nmail: someone@unverified.example\n")
    assert p.returncode == 19 and "unverified.example" in p.stderr
    assert len(outbox_rows(srv)) <= n_rows
    assert entry(srv, uid)["mail"] == [upn3]

    # unbind (removed from the tag) → sign-in blocked + sessions revoked, never deleted
    n_revoke = len(graph_requests(tenant, "POST", "revokeSignInSessions"))
    tag(srv, uid, "delete")
    u = wait_tenant(tenant, upn3, lambda u: u["accountEnabled"] is False)
    wait_for("sessions revoked", lambda: len(graph_requests(tenant, "POST", f"{oid}/revokeSignInSessions")) > 0)
    assert len(graph_requests(tenant, "POST", "revokeSignInSessions")) == n_revoke + 1
    assert not graph_requests(tenant, "DELETE")
    wait_entry_state(srv, uid, "disabled")
    # the refused mail change never reached Graph (checked now that the later unbind went out)
    assert not [r for r in graph_requests(tenant, "PATCH")[n_patch:] if "unverified.example" in str(r["body"])]

    # bound again (directly this time) → enabled again
    modify(srv, uid, "add: ldapsyncDirectory\nldapsyncDirectory: office365\n", check=True)
    wait_tenant(tenant, upn3, lambda u: u["accountEnabled"] is True)
    wait_entry_state(srv, uid, "synced")
    assert len([u for u in tenant.admin.all_users() if u["id"] == oid]) == 1


def test_unbind_by_value_and_by_delete(srv, tenant):
    a, b = unique(), unique()
    for uid in (a, b):
        srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    ua = wait_tenant(tenant, f"{a}@{DOMAIN}")
    ub = wait_tenant(tenant, f"{b}@{DOMAIN}")
    wait_entry_state(srv, b, "synced")
    modify(srv, a, "delete: ldapsyncDirectory\nldapsyncDirectory: office365\n", check=True)
    srv.run("ldapdelete", f"uid={b},{PEOPLE}", check=True)
    for u in (ua, ub):
        wait_tenant(tenant, u["userPrincipalName"], lambda x: x["accountEnabled"] is False)
        wait_for("revoked", lambda u=u: graph_requests(tenant, "POST", f"{u['id']}/revokeSignInSessions"))
    wait_entry_state(srv, a, "disabled")
    assert tenant_user(tenant, ub["id"]) is not None        # never deleted


def test_update_of_an_account_deleted_in_microsoft_365_lands_on_the_entry(srv, tenant):
    """The update PATCHes without a GET first; Graph's 404 still shows as an error, not a retry loop."""
    uid = unique()
    upn = f"{uid}@{DOMAIN}"
    # linked to an existing account (one this client did not just create: no 404 replication retries)
    existing = tenant.admin.add_user(upn=upn, display_name="Imported Person", enabled=True)
    srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    oid = wait_entry_state(srv, uid, "synced")["o365ObjectId"][0]
    assert oid == existing["id"]
    tenant.admin.delete_user(key=oid)
    modify(srv, uid, "replace: sn\nsn: Gone\n", check=True)
    e = wait_entry_state(srv, uid, "error")
    assert "deleted in Microsoft 365" in e["o365LastError"][0]
    assert [r[3] for r in outbox_rows(srv) if r[1] == e["entryUUID"][0]] in (["error"], [])
    assert tenant_user(tenant, upn) is None                  # not recreated behind the admin's back


def test_existing_upn_is_linked_not_duplicated(srv, tenant):
    uid = unique()
    upn = f"{uid}@{DOMAIN}"
    existing = tenant.admin.add_user(upn=upn, display_name="Imported Person", enabled=True)
    srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    e = wait_entry_state(srv, uid, "synced")
    assert e["o365ObjectId"] == [existing["id"]]
    assert [u["id"] for u in tenant.admin.all_users() if u["userPrincipalName"].lower() == upn] == [existing["id"]]
    u = tenant_user(tenant, upn)
    assert u["displayName"] == f"{uid.capitalize()} Test" and u["accountEnabled"] is True
    assert tenant.admin.password_of(key=upn) == PASSWORD
    assert not [r for r in graph_requests(tenant, "POST", r"/users$") if (r["body"] or {}).get("userPrincipalName") == upn]


def test_throttling_and_server_errors_are_waited_out(srv, tenant):
    uid = unique()
    upn = f"{uid}@{DOMAIN}"
    tenant.admin.inject_fault(status=429, count=2, retry_after=1, method="POST", path=r"/users$")
    tenant.admin.inject_fault(status=503, count=3, retry_after=None, method="GET", path=r"/users/")
    srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    u = wait_tenant(tenant, upn, timeout=60)
    assert tenant.admin.password_of(key=upn) == PASSWORD
    assert wait_entry_state(srv, uid, "synced", timeout=30)["o365ObjectId"] == [u["id"]]
    statuses = [r["status"] for r in graph_requests(tenant)]
    assert 429 in statuses and 503 in statuses


def test_permanent_error_lands_on_the_entry_until_the_next_change(srv, tenant):
    uid = unique()
    upn = f"{uid}@{DOMAIN}"
    tenant.admin.inject_fault(status=400, count=1, method="POST", path=r"/users$", code="Request_BadRequest",
                              message="Invalid value specified for property 'usageLocation' of resource 'User'.")
    srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    e = wait_entry_state(srv, uid, "error")
    assert "Invalid value specified for property 'usageLocation'" in e["o365LastError"][0]
    assert "request-id" in e["o365LastError"][0]
    assert PASSWORD not in e["o365LastError"][0]
    assert tenant_user(tenant, upn) is None
    rows = [r for r in outbox_rows(srv) if r[3] == "error"]
    assert rows and rows[-1][6]                              # the password waits, encrypted
    assert PASSWORD not in (rows[-1][6] or "")
    # the next change to the user retries with everything (the queued password included)
    modify(srv, uid, "replace: displayName\ndisplayName: Fixed Person\n", check=True)
    u = wait_tenant(tenant, upn)
    assert u["displayName"] == "Fixed Person" and tenant.admin.password_of(key=upn) == PASSWORD
    e = wait_entry_state(srv, uid, "synced")
    assert "o365LastError" not in e
    assert not [r for r in outbox_rows(srv) if r[1] == e["entryUUID"][0]]


def test_concurrent_changes_keep_order(srv, tenant):
    uid = unique()
    upn = f"{uid}@{DOMAIN}"
    srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    ldif = "".join(f"dn: uid={uid},{PEOPLE}\nchangetype: modify\nreplace: displayName\ndisplayName: Name {i}\n\n"
                   for i in range(20))
    srv.run("ldapmodify", input=ldif, check=True)
    wait_tenant(tenant, upn, lambda u: u["displayName"] == "Name 19")
    e = wait_entry_state(srv, uid, "synced")
    wait_for("the user's queue drained", lambda: not outbox_payloads(srv, e["entryUUID"][0]), 30)
    assert tenant_user(tenant, upn)["displayName"] == "Name 19"
    sent = [int(r["body"]["displayName"].split()[-1]) for r in graph_requests(tenant, "PATCH", e["o365ObjectId"][0])
            if "displayName" in (r["body"] or {}) and r["body"]["displayName"].startswith("Name ")]
    assert sent == sorted(sent) and sent[-1] == 19, sent


# -- operational edges (private servers) ------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill_9_after_acknowledged_writes_loses_nothing(make_server, fake_tenant, backend):
    from helpers import unique

    srv = make_server(backend, office365_config(fake_tenant.info))
    wait_active(srv)
    # Graph answers slowly: the first request is in flight (mid-request) when the server dies,
    # the other changes are still only rows in the outbox.
    fake_tenant.admin.set_latency(seconds=1.5)
    uids = [unique() for _ in range(3)]
    for uid in uids:
        srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    srv.run("ldapmodify", input=f"dn: uid={uids[0]},{PEOPLE}\nchangetype: modify\nreplace: displayName\n"
                                 "displayName: Last Word\n", check=True)
    uuids = {uid: entry(srv, uid)["entryUUID"][0] for uid in uids}
    srv.stop(signal.SIGKILL)
    # Before the restart (whose reconcile pass could repair a lost row): each acknowledged change
    # is either in Microsoft 365 already or still a row in the outbox.
    for uid in uids:
        if tenant_user(fake_tenant, f"{uid}@{DOMAIN}") is None:
            assert outbox_payloads(srv, uuids[uid]), f"the add of {uid} was acknowledged but is neither delivered nor queued"
    first = tenant_user(fake_tenant, f"{uids[0]}@{DOMAIN}")
    if first is None or first["displayName"] != "Last Word":
        assert any("Last Word" in p for p in outbox_payloads(srv, uuids[uids[0]])), "the modify was lost"
    fake_tenant.admin.set_latency(seconds=0)
    srv.start()
    for uid in uids:
        upn = f"{uid}@{DOMAIN}"
        u = wait_tenant(fake_tenant, upn, timeout=30)
        assert wait_entry_state(srv, uid, "synced", timeout=30)["o365ObjectId"] == [u["id"]]
        assert fake_tenant.admin.password_of(key=upn) == PASSWORD
        assert len([x for x in fake_tenant.admin.all_users() if x["userPrincipalName"] == upn]) == 1
    wait_tenant(fake_tenant, f"{uids[0]}@{DOMAIN}", lambda u: u["displayName"] == "Last Word")
    assert wait_for("outbox drained", lambda: not outbox_rows(srv), 30)


def test_outage_is_waited_out(make_server, fake_tenant):
    from helpers import unique

    srv = make_server("sqlite", office365_config(fake_tenant.info))
    wait_active(srv)
    uid = unique()
    fake_tenant.admin.outage(seconds=3, mode="drop")       # connections reset
    srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    assert srv.run("ldapwhoami").returncode == 0            # LDAP keeps serving
    u = wait_tenant(fake_tenant, f"{uid}@{DOMAIN}", timeout=60)
    assert wait_entry_state(srv, uid, "synced", timeout=30)["o365ObjectId"] == [u["id"]]


def test_guard_soft_match_off_block_only_and_retry_errors(make_server, fake_tenant):
    from helpers import unique

    srv = make_server("sqlite", office365_config(fake_tenant.info, soft_match=False, unbind_action="block",
                                                 disable_threshold=2))
    wait_active(srv)

    # soft_match = false: an existing account with the UPN is an error on the entry, not a takeover
    taken = unique()
    existing = fake_tenant.admin.add_user(upn=f"{taken}@{DOMAIN}", display_name="Someone Else")
    srv.run("ldapadd", input=person(taken, password=PASSWORD, bound=True), check=True)
    e = wait_entry_state(srv, taken, "error")
    assert "soft_match" in e["o365LastError"][0] and "o365ObjectId" not in e
    assert fake_tenant.admin.get_user(key=existing["id"])["displayName"] == "Someone Else"

    # a permanent error, then `o365 reconcile --retry-errors`
    uid = unique()
    fake_tenant.admin.inject_fault(status=403, count=1, method="POST", path=r"/users$")
    srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    wait_entry_state(srv, uid, "error")
    p = srv.cli("o365", "reconcile", "--retry-errors")
    assert p.returncode == 0 and b"tried again" in p.stdout, p.stdout + p.stderr
    wait_tenant(fake_tenant, f"{uid}@{DOMAIN}")
    wait_entry_state(srv, uid, "synced")

    # the mass-disable guard (threshold 2): one write unbinding exactly 2 users goes out at once,
    # one write unbinding 3 users (one over) is held until `o365 release`
    pair_and_group = [unique() for _ in range(5)]
    for g in pair_and_group:
        srv.run("ldapadd", input=person(g), check=True)      # no password yet: the cleartext comes
        tag(srv, g)                                             # with ldappasswd once bound
        srv.run("ldappasswd", "-s", PASSWORD, f"uid={g},{PEOPLE}", check=True)
    all_ids = [wait_tenant(fake_tenant, f"{g}@{DOMAIN}", lambda u: u["accountEnabled"] is True)["id"]
               for g in pair_and_group]
    for g in pair_and_group:
        wait_entry_state(srv, g, "synced")
    pair, group = pair_and_group[:2], pair_and_group[2:]
    pair_ids, ids = all_ids[:2], all_ids[2:]

    def untag(users: list[str]) -> None:
        members = "".join(f"member: uid={g},{PEOPLE}\n" for g in users)
        srv.run("ldapmodify", input=f"dn: cn=Provisioning - Office 365,ou=tags,dc=example,dc=com\nchangetype: modify\n"
                                     f"delete: member\n{members}", check=True)
    untag(pair)
    assert not [r for r in outbox_rows(srv) if r[3] == "held"]
    for i in pair_ids:
        wait_for("disabled at the threshold", lambda i=i: fake_tenant.admin.get_user(key=i)["accountEnabled"] is False, 30)

    untag(group)
    wait_for("rows held", lambda: len([r for r in outbox_rows(srv) if r[3] == "held"]) == 3, 30)

    def depth() -> str:
        p = srv.run("ldapsearch", "-LLL", "-b", CONNECTOR, "-s", "base", "(objectClass=*)", "o365QueueDepth")
        return p.stdout
    wait_for("queue depth shown", lambda: "o365QueueDepth: 3" in depth(), 30)
    # a change queued after the held ones goes out; the held ones still have not
    modify(srv, uid, "replace: displayName\ndisplayName: After The Hold\n", check=True)
    wait_tenant(fake_tenant, f"{uid}@{DOMAIN}", lambda u: u["displayName"] == "After The Hold", timeout=30)
    assert all(fake_tenant.admin.get_user(key=i)["accountEnabled"] is True for i in ids)
    p = srv.cli("o365", "release")
    assert p.returncode == 0 and b"released 3" in p.stdout, p.stdout + p.stderr
    for i in ids:
        wait_for("disabled", lambda i=i: fake_tenant.admin.get_user(key=i)["accountEnabled"] is False)
    for g in group:
        wait_entry_state(srv, g, "disabled")
    # unbind_action = "block": sessions are not revoked
    assert not graph_requests(fake_tenant, "POST", "revokeSignInSessions")
    assert tenant_user(fake_tenant, ids[0]) is not None
    assert entry(srv, group[0])["o365ObjectId"] == [ids[0]]
    wait_for("queue depth back to 0", lambda: "o365QueueDepth: 0" in depth(), 30)
    modify(srv, group[0], "add: ldapsyncDirectory\nldapsyncDirectory: office365\n", check=True)
    wait_for("enabled again", lambda: fake_tenant.admin.get_user(key=ids[0])["accountEnabled"] is True)
