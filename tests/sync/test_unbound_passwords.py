"""Passwords end to end (issue 14): the password of an unbound user kept for ``unbound_password_ttl``,
and a password that fails the policy never sent to Graph.

A real server (twistd) per test, ldap-utils, the fake tenant process (its ``password_of`` record of
the last password set), SQLite and PostgreSQL:

- a password set while the user is not bound (ldapadd with userPassword) is pushed when the user is
  bound within the TTL: the account is created enabled with it; at rest it is sealed (the cleartext
  is in no database page, nor the WAL); once delivered, the kept row is gone;
- with a short TTL ("2s") the kept password is purged, and binding after that creates the account
  blocked, with o365PasswordPending: TRUE;
- deleting the entry deletes its kept password;
- a password that fails the policy (here a pre-hashed one an admin set, which the policy could not
  check, captured when the user binds with it) is never sent to Graph: the account stays as it is,
  the entry is not put in error, and the user is mailed to choose a new one;
- a bound account disabled in the portal is enabled again by the reconciler's drift row when
  Microsoft 365 has the directory's current password, and one created blocked is not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import office365_config  # type: ignore[import-not-found]
from helpers import PEOPLE, mails_to, ssha, unique, wait_for, whoami
from sync.test_worker import DOMAIN, PASSWORD, entry, person, tag, wait_active, wait_entry_state, wait_tenant  # type: ignore[import-not-found]

pytestmark = pytest.mark.e2e
BACKENDS = ["sqlite", "postgresql"]


def kept_rows(srv: Any) -> list[tuple[str, str]]:
    """(entry_uuid, secret) of every kept password, straight from SQL."""
    import sqlalchemy as sa

    eng = sa.create_engine(srv.db_url)
    try:
        with eng.connect() as c:
            return [(r[0], r[1]) for r in c.exec_driver_sql(
                "SELECT entry_uuid, secret FROM o365_unbound_passwords").fetchall()]
    finally:
        eng.dispose()


def database_bytes(srv: Any) -> bytes:
    """SQLite: the database file and its WAL as stored on disk."""
    db = Path(srv.db_url.split("///", 1)[1])
    return b"".join(p.read_bytes() for p in (db, db.with_name(db.name + "-wal")) if p.exists())


def uuid_of(srv: Any, uid: str) -> str:
    return entry(srv, uid)["entryUUID"][0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_password_set_while_unbound_is_pushed_at_a_bind_within_the_ttl(make_server, fake_tenant, backend):
    srv = make_server(backend, office365_config(fake_tenant.info))
    wait_active(srv)
    uid = unique("keep")
    upn = f"{uid}@{DOMAIN}"
    srv.run("ldapadd", input=person(uid, password=PASSWORD), check=True)      # not bound yet
    rows = kept_rows(srv)
    assert [u for u, _ in rows] == [uuid_of(srv, uid)]
    assert all(PASSWORD not in s and PASSWORD.encode().hex() not in s for _, s in rows)
    if backend == "sqlite":
        assert PASSWORD.encode() not in database_bytes(srv)              # sealed at rest
    tag(srv, uid)                                                        # the usual order: then the group
    user = wait_tenant(fake_tenant, upn, timeout=30)
    assert user["accountEnabled"] is True
    assert fake_tenant.admin.password_of(key=upn) == PASSWORD
    e = wait_entry_state(srv, uid, "synced", timeout=30)
    assert "o365PasswordPending" not in e
    assert kept_rows(srv) == []                                          # moved to the queue, delivered, gone


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_password_is_gone_after_the_ttl(make_server, fake_tenant, backend):
    srv = make_server(backend, office365_config(fake_tenant.info, unbound_password_ttl="2s"))
    wait_active(srv)
    uid = unique("ttl")
    upn = f"{uid}@{DOMAIN}"
    srv.run("ldapadd", input=person(uid, password=PASSWORD), check=True)
    assert len(kept_rows(srv)) == 1
    wait_for("the kept password purged after its TTL", lambda: kept_rows(srv) == [], timeout=30, interval=0.5)
    modify = f"dn: uid={uid},{PEOPLE}\nchangetype: modify\nadd: ldapsyncDirectory\nldapsyncDirectory: office365\n"
    srv.run("ldapmodify", input=modify, check=True)
    user = wait_tenant(fake_tenant, upn, timeout=30)
    assert user["accountEnabled"] is False                               # blocked: the password is not known
    assert fake_tenant.admin.password_of(key=upn) != PASSWORD
    e = wait_entry_state(srv, uid, "synced", timeout=30)
    assert e.get("o365PasswordPending") == ["TRUE"]
    # ... and the user's next bind hands it over
    assert whoami(srv, f"uid={uid},{PEOPLE}", PASSWORD).returncode == 0
    wait_tenant(fake_tenant, upn, lambda u: u["accountEnabled"] is True, timeout=30)
    assert fake_tenant.admin.password_of(key=upn) == PASSWORD


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_password_is_gone_when_the_entry_is_deleted(make_server, fake_tenant, backend):
    srv = make_server(backend, office365_config(fake_tenant.info))
    wait_active(srv)
    uid, other = unique("del"), unique("stay")
    srv.run("ldapadd", input=person(uid, password=PASSWORD) + person(other, password=PASSWORD + "2"), check=True)
    keep = uuid_of(srv, other)
    assert len(kept_rows(srv)) == 2
    srv.run("ldapdelete", f"uid={uid},{PEOPLE}", check=True)
    assert [u for u, _ in kept_rows(srv)] == [keep]


@pytest.mark.parametrize("backend", BACKENDS)
def test_password_failing_the_policy_is_never_sent_to_graph(make_server, fake_tenant, smtp_sink, backend):
    weak = "alllowercaseletters"            # long enough, one character class: the policy refuses it
    srv = make_server(backend, office365_config(fake_tenant.info) + f'[mail]\nsmtp = "{smtp_sink.endpoint}"\n')
    wait_active(srv)
    uid = unique("weak")
    upn = f"{uid}@{DOMAIN}"
    # Only a hash (an old export, a pre-hashed value an admin set): the policy could not check it.
    srv.run("ldapadd", input=person(uid, bound=True, extra=f"userPassword: {ssha(weak)}\n"), check=True)
    wait_tenant(fake_tenant, upn, lambda u: u["accountEnabled"] is False, timeout=30)
    e = wait_entry_state(srv, uid, "synced", timeout=30)
    assert e.get("o365PasswordPending") == ["TRUE"]
    created_with = fake_tenant.admin.password_of(key=upn)
    assert whoami(srv, f"uid={uid},{PEOPLE}", weak).returncode == 0        # the capture sees the weak cleartext
    mail = wait_for("the mail asking for a new password", lambda: next(
        (m for m in mails_to(smtp_sink, upn) if m.message["Subject"] == "Please choose a new password"), None), 30)
    assert "/reset?token=" in mail.body() and weak not in mail.body()
    # A later change is delivered after whatever the bind queued: nothing with the weak password went.
    srv.run("ldapmodify", input=f"dn: uid={uid},{PEOPLE}\nchangetype: modify\nreplace: sn\nsn: After\n", check=True)
    wait_tenant(fake_tenant, upn, lambda u: u.get("surname") == "After", timeout=30)
    e = wait_entry_state(srv, uid, "synced", timeout=30)
    assert "o365LastError" not in e
    assert e.get("o365PasswordPending") == ["TRUE"]
    assert fake_tenant.admin.password_of(key=upn) == created_with != weak
    assert fake_tenant.admin.get_user(key=upn)["accountEnabled"] is False   # the account keeps its state
    assert weak not in srv.log.read_text()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bound_account_disabled_in_the_portal_is_enabled_again_only_with_the_current_password(
        make_server, fake_tenant, backend):
    """The reconciler's drift row for a bound user whose account is disabled: enabled again when
    Microsoft 365 has the directory's current password; one created blocked (only a hash: the
    password is pending) is not enabled by it."""
    srv = make_server(backend, office365_config(fake_tenant.info, reconcile_interval="2s"))
    wait_active(srv)
    known, pending = unique("known"), unique("pend")
    srv.run("ldapadd", input=person(known, password=PASSWORD, bound=True)
            + person(pending, bound=True, extra=f"userPassword: {ssha(PASSWORD)}\n"), check=True)
    wait_entry_state(srv, known, "synced", timeout=30)
    assert wait_entry_state(srv, pending, "synced", timeout=30).get("o365PasswordPending") == ["TRUE"]
    fake_tenant.admin.portal_edit(key=f"{known}@{DOMAIN}", accountEnabled=False)
    fake_tenant.admin.portal_edit(key=f"{pending}@{DOMAIN}", displayName="Portal")
    wait_tenant(fake_tenant, f"{known}@{DOMAIN}", lambda u: u["accountEnabled"] is True, timeout=30)
    wait_tenant(fake_tenant, f"{pending}@{DOMAIN}", lambda u: u["displayName"] != "Portal", timeout=30)
    assert fake_tenant.admin.get_user(key=f"{pending}@{DOMAIN}")["accountEnabled"] is False
    assert fake_tenant.admin.password_of(key=f"{known}@{DOMAIN}") == PASSWORD


@pytest.mark.parametrize("backend", BACKENDS)
def test_password_changed_while_a_delivery_is_in_flight_keeps_the_account_blocked(make_server, fake_tenant, backend):
    """A password is being delivered (Graph answers slowly) when the user is unbound and its
    password changed again (nothing kept: unbound_password_ttl = "0"): the delivery's end must
    not clear the o365PasswordPending the later change set, so the re-bind keeps the account
    blocked rather than enabling the password from before."""
    srv = make_server(backend, office365_config(fake_tenant.info, unbound_password_ttl="0"))
    wait_active(srv)
    uid = unique("race")
    upn = f"{uid}@{DOMAIN}"
    dn = f"uid={uid},{PEOPLE}"
    srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    wait_entry_state(srv, uid, "synced", timeout=30)
    fake_tenant.admin.set_latency(seconds=3.0)
    try:
        assert srv.run("ldappasswd", "-s", "Second-Pass-word-1!", dn).returncode == 0      # in flight
        srv.run("ldapmodify", input=f"dn: {dn}\nchangetype: modify\ndelete: ldapsyncDirectory\n", check=True)
        assert srv.run("ldappasswd", "-s", "Third-Pass-word-2!", dn).returncode == 0       # while unbound
    finally:
        fake_tenant.admin.set_latency(seconds=0)
    wait_tenant(fake_tenant, upn, lambda u: u["accountEnabled"] is False, timeout=30)
    e = wait_entry_state(srv, uid, "disabled", timeout=30)
    assert e.get("o365PasswordPending") == ["TRUE"]
    srv.run("ldapmodify", input=f"dn: {dn}\nchangetype: modify\nadd: ldapsyncDirectory\nldapsyncDirectory: office365\n",
            check=True)
    e = wait_entry_state(srv, uid, "synced", timeout=30)
    assert e.get("o365PasswordPending") == ["TRUE"]
    assert fake_tenant.admin.get_user(key=upn)["accountEnabled"] is False
    assert fake_tenant.admin.password_of(key=upn) != "Third-Pass-word-2!"
    # the user's next bind hands the current password over, and the account is enabled
    assert whoami(srv, dn, "Third-Pass-word-2!").returncode == 0
    wait_tenant(fake_tenant, upn, lambda u: u["accountEnabled"] is True, timeout=30)
    assert fake_tenant.admin.password_of(key=upn) == "Third-Pass-word-2!"


BANNED = "P@ssw0rd1!"        # our policy accepts it (10 characters, 4 classes); Entra's banned list does not


def refused_mail(sink: Any, upn: str) -> Any:
    return wait_for("the mail asking for another password", lambda: next(
        (m for m in mails_to(sink, upn) if m.message["Subject"] == "Please choose a new password"
         and "too easy to guess" in m.body()), None), 30)


@pytest.mark.parametrize("backend", BACKENDS)
def test_password_refused_by_microsoft365_leaves_nothing_in_error(make_server, fake_tenant, smtp_sink, backend):
    """Microsoft 365 refuses a password our policy accepted (Entra's banned-password list): the
    rest is delivered without it, the entry is not put in error, the user is mailed to choose
    another (not "sign in once", which would hand over the same password), and the queue goes on.

    - a new user created with it: created blocked, o365PasswordPending: TRUE;
    - a bound, enabled user changing to it: the account keeps its state and its old password;
    - a user we blocked (unbound), re-bound with it: stays blocked, pending; a good password then
      set is pushed and the account enabled."""
    srv = make_server(backend, office365_config(fake_tenant.info) + f'[mail]\nsmtp = "{smtp_sink.endpoint}"\n')
    wait_active(srv)
    new, changed, rebound = unique("ban"), unique("chg"), unique("reb")
    srv.run("ldapadd", input=person(new, password=BANNED, bound=True)
            + person(changed, password=PASSWORD, bound=True) + person(rebound, password=PASSWORD, bound=True),
            check=True)
    # 1. created with a refused password
    user = wait_tenant(fake_tenant, f"{new}@{DOMAIN}", timeout=30)
    e = wait_entry_state(srv, new, "synced", timeout=30)
    assert user["accountEnabled"] is False
    assert e.get("o365PasswordPending") == ["TRUE"] and "o365LastError" not in e
    assert fake_tenant.admin.password_of(key=f"{new}@{DOMAIN}") != BANNED
    mail = refused_mail(smtp_sink, f"{new}@{DOMAIN}")
    assert "/reset?token=" in mail.body() and BANNED not in mail.body()
    assert not [m for m in mails_to(smtp_sink, f"{new}@{DOMAIN}") if "ready" in m.message["Subject"]]
    # 2. a bound, enabled user changes to it
    wait_entry_state(srv, changed, "synced", timeout=30)
    dn = f"uid={changed},{PEOPLE}"
    assert srv.run("ldappasswd", "-s", BANNED, dn).returncode == 0
    srv.run("ldapmodify", input=f"dn: {dn}\nchangetype: modify\nreplace: sn\nsn: Later\n", check=True)
    wait_tenant(fake_tenant, f"{changed}@{DOMAIN}", lambda u: u.get("surname") == "Later", timeout=30)
    e = wait_entry_state(srv, changed, "synced", timeout=30)
    assert "o365LastError" not in e
    assert fake_tenant.admin.get_user(key=f"{changed}@{DOMAIN}")["accountEnabled"] is True
    assert fake_tenant.admin.password_of(key=f"{changed}@{DOMAIN}") == PASSWORD
    refused_mail(smtp_sink, f"{changed}@{DOMAIN}")
    # 3. blocked by us, re-bound with it
    wait_entry_state(srv, rebound, "synced", timeout=30)
    dn = f"uid={rebound},{PEOPLE}"
    srv.run("ldapmodify", input=f"dn: {dn}\nchangetype: modify\ndelete: ldapsyncDirectory\n", check=True)
    wait_entry_state(srv, rebound, "disabled", timeout=30)
    assert srv.run("ldappasswd", "-s", BANNED, dn).returncode == 0       # kept while unbound
    srv.run("ldapmodify", input=f"dn: {dn}\nchangetype: modify\nadd: ldapsyncDirectory\nldapsyncDirectory: office365\n",
            check=True)
    e = wait_entry_state(srv, rebound, "synced", timeout=30)
    assert e.get("o365PasswordPending") == ["TRUE"] and "o365LastError" not in e
    assert fake_tenant.admin.get_user(key=f"{rebound}@{DOMAIN}")["accountEnabled"] is False
    refused_mail(smtp_sink, f"{rebound}@{DOMAIN}")
    good = "Another-Go0d-one!"
    assert srv.run("ldappasswd", "-s", good, dn).returncode == 0
    wait_tenant(fake_tenant, f"{rebound}@{DOMAIN}", lambda u: u["accountEnabled"] is True, timeout=30)
    assert fake_tenant.admin.password_of(key=f"{rebound}@{DOMAIN}") == good
    assert BANNED not in srv.log.read_text()


@pytest.mark.parametrize("backend", BACKENDS)
def test_password_captured_after_a_rebinding_that_microsoft365_already_holds(make_server, fake_tenant, backend):
    """Seed 71: added bound with a password, unbound and bound again while the create is in flight
    (the re-binding is flagged o365PasswordPending: the planner cannot know the create will carry
    the password), then the user binds: the capture queues the password Microsoft 365 got with
    the create, and Graph refuses to set the same password again.  That refusal is no error:
    the account is enabled with it."""
    srv = make_server(backend, office365_config(fake_tenant.info))
    wait_active(srv)
    uid = unique("same")
    upn = f"{uid}@{DOMAIN}"
    dn = f"uid={uid},{PEOPLE}"
    fake_tenant.admin.set_latency(seconds=2.0)
    try:
        srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
        # the worker's look-up by sign-in name has been answered: its create is on the way (2 s)
        wait_for("the look-up before the create", lambda: fake_tenant.admin.requests(
            kind="graph", method="GET", path=uid), timeout=30, interval=0.05)
        srv.run("ldapmodify", input=f"dn: {dn}\nchangetype: modify\ndelete: ldapsyncDirectory\n", check=True)
        srv.run("ldapmodify", input=f"dn: {dn}\nchangetype: modify\nadd: ldapsyncDirectory\n"
                "ldapsyncDirectory: office365\n", check=True)
        assert entry(srv, uid).get("o365PasswordPending") == ["TRUE"]
        assert whoami(srv, dn, PASSWORD).returncode == 0             # the capture queues it again
    finally:
        fake_tenant.admin.set_latency(seconds=0)
    srv.run("ldapmodify", input=f"dn: {dn}\nchangetype: modify\nreplace: sn\nsn: After\n", check=True)
    wait_tenant(fake_tenant, upn, lambda u: u.get("surname") == "After", timeout=60)
    e = wait_entry_state(srv, uid, "synced", timeout=30)
    assert "o365LastError" not in e and "o365PasswordPending" not in e, e
    assert fake_tenant.admin.get_user(key=upn)["accountEnabled"] is True
    assert fake_tenant.admin.password_of(key=upn) == PASSWORD
