"""What an independent audit found untested (issue 14), end to end: a real server (twistd), ldap-utils,
the SMTP sink, the fake tenant over HTTPS with real MSAL and the real Graph client.

- a **tag** binding of a user who needs activation mails it, as a direct binding does: the activation
  link to an imported user (no password), "sign in once" to a user whose password the directory holds
  only as a hash (then that sign-in hands it to Microsoft 365);
- a bound imported user's password reaches Microsoft 365 once it is set (activation page, ldappasswd);
- the reminder mail 7 days before a **delegated** refresh token's 90-day expiry, once; none for
  application (app-only) sign-in;
- the connector's move to ``needs-reauthorization`` when the refresh token is refused, shown by
  ``ldapsync o365 status``, ``cn=Monitor`` and ``/readyz`` and mailed to the admin once; queued
  deliveries wait (not lost, not in error) and flow once an admin has signed in again; likewise an
  expired client secret (application sign-in), which the running server replaces when told.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from conftest import free_port, office365_config  # type: ignore[import-not-found]
from helpers import PEOPLE, SUFFIX, Client, link_in, parse_ldif_output, unique, wait_for, wait_mail, whoami

pytestmark = pytest.mark.e2e
CONNECTOR = f"cn=office365,ou=directories,{SUFFIX}"
TAG = f"cn=Provisioning - Office 365,ou=tags,{SUFFIX}"
MONITOR_CONNECTOR = "cn=Connector,cn=Monitor"
DOMAIN = "contoso.com"
PASSWORD = "Corr3ct-Horse-Battery!"
ADMIN_MAIL = "it@example.com"
DAY = 86400.0


# -- helpers ------------------------------------------------------------------------------

def mail_config(sink: Any) -> str:
    return f'[mail]\nsmtp = "{sink.endpoint}"\nadmin_address = "{ADMIN_MAIL}"\n'


def entry(srv: Any, dn: str) -> dict[str, list[str]]:
    p = srv.run("ldapsearch", "-LLL", "-b", dn, "-s", "base", "(objectClass=*)", "*", "+")
    assert p.returncode == 0, f"ldapsearch {dn}: exit {p.returncode}: {p.stdout}{p.stderr}"
    return parse_ldif_output(p.stdout)[dn]


def connector_entry(srv: Any) -> dict[str, list[str]]:
    return entry(srv, CONNECTOR)


def wait_connector(srv: Any, state: str, timeout: float = 60.0) -> dict[str, list[str]]:
    def check() -> dict[str, list[str]] | None:
        st = connector_entry(srv)
        return st if st.get("o365ConnectorState") == [state] else None
    return wait_for(f"connector state {state}", check, timeout, 0.3)


def wait_synced(srv: Any, dn: str, timeout: float = 30.0) -> dict[str, list[str]]:
    def check() -> dict[str, list[str]] | None:
        e = entry(srv, dn)
        return e if e.get("o365SyncState") == ["synced"] else None
    return wait_for(f"{dn} synced", check, timeout)


def person(uid: str, *, password: str | None = None, bound: bool = False) -> str:
    text = (f"dn: uid={uid},{PEOPLE}\nobjectClass: inetOrgPerson\nobjectClass: ldapsyncUser\nuid: {uid}\n"
            f"cn: {uid.capitalize()} Test\nsn: Test\ngivenName: {uid.capitalize()}\nmail: {uid}@{DOMAIN}\n")
    if password:
        text += f"userPassword: {password}\n"
    if bound:
        text += "ldapsyncDirectory: office365\n"
    return text + "\n"


def bind_by_tag(srv: Any, dn: str) -> None:
    srv.run("ldapmodify", input=f"dn: {TAG}\nchangetype: modify\nadd: member\nmember: {dn}\n", check=True)


def bind_directly(srv: Any, dn: str) -> None:
    srv.run("ldapmodify", input=f"dn: {dn}\nchangetype: modify\nadd: ldapsyncDirectory\nldapsyncDirectory: office365\n",
            check=True)


def import_user(srv: Any, tenant: Any, uid: str) -> tuple[str, str]:
    """A Microsoft 365 user imported into the directory (inactive, not bound): (dn, upn)."""
    upn = f"{uid}@{DOMAIN}"
    tenant.admin.add_user(upn=upn, display_name=f"{uid.capitalize()} Imported", mailNickname=uid, mail=upn,
                          givenName=uid.capitalize(), surname="Imported")
    p = srv.cli("o365", "import", "--user", upn)
    assert p.returncode == 0, p.stdout + p.stderr
    dn = f"uid={uid},{PEOPLE}"
    e = entry(srv, dn)
    assert "userPassword" not in e and "ldapsyncDirectory" not in e
    return dn, upn


def activate_by_page(srv: Any, msg: Any, password: str) -> None:
    link = link_in(msg)
    token = link.split("token=")[1]
    c = Client(srv.web_url)
    status, _, page = c.request("/" + link.split("/", 3)[3])
    assert status == 200 and "Activate your account" in page
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    status, _, page = c.request("/activate", {"token": token, "new": password, "confirm": password, "csrf": csrf})
    assert status == 200 and "Your account is active" in page, page


def activation_mails(sink: Any, address: str) -> list[Any]:
    return [m for m in sink.messages() if address in m.rcpt_to and m.message["Subject"] == "Activate your account"]


def admin_mails(sink: Any) -> list[Any]:
    return [m for m in sink.messages() if ADMIN_MAIL in m.rcpt_to]


def http_get(port: int, path: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def delegated_server(make_server: Any, fake_tenant: Any, backend: str, extra: str = "") -> Any:
    """A server in delegated mode whose admin has signed in with the device code (auto-approved)."""
    srv = make_server(backend, office365_config(fake_tenant.info, auth="delegated") + extra, start=False)
    assert srv.cli("init").returncode == 0
    p = srv.cli("o365", "authorize")
    assert p.returncode == 0, p.stdout + p.stderr
    return srv


# -- 1. tag binding → activation mail ------------------------------------------------------

@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_tag_binding_of_an_imported_user_mails_the_activation_link_like_a_direct_binding(
        backend: str, make_server: Any, fake_tenant: Any, smtp_sink: Any) -> None:
    srv = make_server(backend, office365_config(fake_tenant.info) + mail_config(smtp_sink))
    wait_connector(srv, "active")
    by_tag, by_tag_upn = import_user(srv, fake_tenant, unique("tag"))
    direct, direct_upn = import_user(srv, fake_tenant, unique("dir"))
    # not bound yet: no mail (a later positive event — the direct binding's mail — comes first)
    bind_directly(srv, direct)
    msg = wait_mail(smtp_sink, direct_upn)
    assert msg.message["Subject"] == "Activate your account"
    assert activation_mails(smtp_sink, by_tag_upn) == []

    bind_by_tag(srv, by_tag)
    msg = wait_mail(smtp_sink, by_tag_upn)
    assert msg.message["Subject"] == "Activate your account"
    assert link_in(msg)
    assert "ldapsyncActivationExpires" in entry(srv, by_tag)
    # linked to the imported account, not duplicated
    e = wait_synced(srv, by_tag)
    assert e["o365ObjectId"] == [fake_tenant.admin.get_user(key=by_tag_upn)["id"]]
    assert len(activation_mails(smtp_sink, by_tag_upn)) == 1


def ssha(password: str) -> str:
    """An OpenLDAP ``{SSHA}`` value: what a migrated directory holds instead of the password."""
    import base64
    import hashlib
    import os

    salt = os.urandom(8)
    return "{SSHA}" + base64.b64encode(hashlib.sha1(password.encode() + salt).digest() + salt).decode()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_tag_binding_of_a_user_whose_password_is_pending_mails_sign_in_once_like_a_direct_binding(
        backend: str, make_server: Any, fake_tenant: Any, smtp_sink: Any) -> None:
    """The directory holds only a hash (a migrated entry): bound by the tag, the account is created
    with sign-in blocked and the user is asked by mail to sign in once — as after a direct binding;
    that sign-in hands the password to Microsoft 365."""
    srv = make_server(backend, office365_config(fake_tenant.info) + mail_config(smtp_sink))
    wait_connector(srv, "active")
    users = {}
    for how in ("tag", "dir"):
        uid = unique(how)
        pw = f"Migrated-{uid}-Pw1!"
        srv.run("ldapadd", input=person(uid).rstrip("\n") + f"\nuserPassword: {ssha(pw)}\n\n", check=True)
        users[how] = (f"uid={uid},{PEOPLE}", f"{uid}@{DOMAIN}", pw)
    bind_directly(srv, users["dir"][0])
    msg = wait_mail(smtp_sink, users["dir"][1])
    assert msg.message["Subject"] == "Your Microsoft 365 account is ready"
    bind_by_tag(srv, users["tag"][0])
    msg = wait_mail(smtp_sink, users["tag"][1])
    assert msg.message["Subject"] == "Your Microsoft 365 account is ready"
    assert "/signin" in msg.body()
    for dn, upn, pw in users.values():
        e = wait_synced(srv, dn)
        assert e.get("o365PasswordPending") == ["TRUE"]
        u = fake_tenant.admin.get_user(key=upn)
        assert u["accountEnabled"] is False and fake_tenant.admin.password_of(key=upn) != pw
        # the user signs in once (an LDAP bind): Microsoft 365 gets the password and is enabled
        assert whoami(srv, dn, pw).returncode == 0
        wait_for(f"{upn}'s password in Microsoft 365", lambda: fake_tenant.admin.password_of(key=upn) == pw, 30)
        wait_for(f"{upn} enabled", lambda: fake_tenant.admin.get_user(key=upn)["accountEnabled"] is True, 30)
    assert len([m for m in smtp_sink.messages() if users["tag"][1] in m.rcpt_to]) == 1


# -- 4. bound imported user: the password set later reaches Microsoft 365 --------------------

@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_password_of_a_bound_imported_user_is_pushed_once_it_is_set(
        backend: str, make_server: Any, fake_tenant: Any, smtp_sink: Any) -> None:
    srv = make_server(backend, office365_config(fake_tenant.info) + mail_config(smtp_sink))
    wait_connector(srv, "active")
    by_page, page_upn = import_user(srv, fake_tenant, unique("page"))
    by_passwd, passwd_upn = import_user(srv, fake_tenant, unique("pwd"))
    before = {upn: fake_tenant.admin.password_of(key=upn) for upn in (page_upn, passwd_upn)}
    bind_by_tag(srv, by_page)
    bind_directly(srv, by_passwd)
    wait_synced(srv, by_page)
    wait_synced(srv, by_passwd)
    # linked while the directory had no password: Microsoft 365 keeps the account's own password
    assert {upn: fake_tenant.admin.password_of(key=upn) for upn in before} == before

    # the user activates through the page (link from the mail)
    chosen = "Page-Chosen-Passw0rd!"
    activate_by_page(srv, wait_mail(smtp_sink, page_upn), chosen)
    assert whoami(srv, by_page, chosen).returncode == 0
    wait_for("the page's password in Microsoft 365", lambda: fake_tenant.admin.password_of(key=page_upn) == chosen, 30)
    # an admin sets the other one's password with ldappasswd (Password Modify)
    other = "Ldappasswd-Set-Passw0rd!"
    p = srv.run("ldappasswd", "-s", other, by_passwd)
    assert p.returncode == 0, p.stderr
    wait_for("ldappasswd's password in Microsoft 365",
             lambda: fake_tenant.admin.password_of(key=passwd_upn) == other, 30)
    for dn, upn in ((by_page, page_upn), (by_passwd, passwd_upn)):
        u = fake_tenant.admin.get_user(key=upn)
        assert u["accountEnabled"] is True and u["passwordProfile"]["forceChangePasswordNextSignIn"] is False
        e = wait_synced(srv, dn)
        assert e["o365ObjectId"] == [u["id"]] and "o365LastError" not in e
    log = srv.log.read_text()
    assert chosen not in log and other not in log


# -- 2. the delegated refresh token's expiry reminder ----------------------------------------

@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_delegated_refresh_token_reminder_seven_days_before_expiry_once(
        backend: str, make_server: Any, fake_tenant: Any, smtp_sink: Any) -> None:
    # The admin signed in 84 days ago (the server's clock is set back for the sign-in): the refresh
    # token, unused since, dies in 6 days.
    srv = make_server(backend, office365_config(fake_tenant.info, auth="delegated") + mail_config(smtp_sink),
                      start=False)
    assert srv.cli("init").returncode == 0
    srv.advance_clock(-84 * DAY)
    p = srv.cli("o365", "authorize")
    assert p.returncode == 0, p.stdout + p.stderr
    srv.advance_clock(84 * DAY)
    srv.start()
    st = wait_connector(srv, "active")
    msgs = wait_for("the reminder to the admin", lambda: admin_mails(smtp_sink), 60)
    assert len(msgs) == 1
    assert "expires soon" in msgs[0].message["Subject"] and "sign-in (refresh token)" in msgs[0].message["Subject"]
    body = msgs[0].body()
    assert "ldapsync o365 authorize" in body and "nothing is lost" in body
    assert st["o365CredentialExpiry"]
    # later checks — the server's after a restart, the CLI's (which has ended when it returns, and the
    # sink stores a mail before it answers) — send no second reminder
    srv.restart()
    wait_connector(srv, "active")
    for _ in range(2):
        p = srv.cli("o365", "reconcile")
        assert p.returncode == 0, p.stdout + p.stderr
    assert len(admin_mails(smtp_sink)) == 1
    # the token still works: Microsoft 365 gets changes (a positive event after the checks)
    uid = unique("rem")
    srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    wait_for("user created", lambda: fake_tenant.admin.get_user(key=f"{uid}@{DOMAIN}"), 30)
    assert len(admin_mails(smtp_sink)) == 1


def test_no_refresh_token_reminder_in_application_mode(make_server: Any, fake_tenant: Any, smtp_sink: Any) -> None:
    # Application sign-in has no refresh token: 84 days on, nothing is about to expire.
    srv = make_server("sqlite", office365_config(fake_tenant.info) + mail_config(smtp_sink), start=False)
    srv.advance_clock(84 * DAY)
    srv.start()
    wait_connector(srv, "active")
    p = srv.cli("o365", "reconcile")          # one more complete check, in a process that has ended
    assert p.returncode == 0, p.stdout + p.stderr
    uid = unique("app")
    srv.run("ldapadd", input=person(uid, password=PASSWORD, bound=True), check=True)
    wait_for("user created", lambda: fake_tenant.admin.get_user(key=f"{uid}@{DOMAIN}"), 30)
    assert admin_mails(smtp_sink) == []
    # what the connector shows as expiring is the app's client secret, and not within 7 days
    st = connector_entry(srv)
    assert st["o365AuthMode"][0].startswith("application")
    for value in st.get("o365CredentialExpiry", []):
        assert value > time.strftime("%Y%m%d%H%M%SZ", time.gmtime(time.time() + 91 * DAY)), value


# -- 3. needs-reauthorization when the refresh token is refused ------------------------------

@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_refused_refresh_token_needs_reauthorization_and_deliveries_wait(
        backend: str, make_server: Any, fake_tenant: Any, smtp_sink: Any) -> None:
    port = free_port()
    srv = delegated_server(make_server, fake_tenant, backend,
                           f'[metrics]\nlisten = "tcp:{port}:interface=127.0.0.1"\n' + mail_config(smtp_sink))
    srv.start()
    wait_connector(srv, "active")
    first = unique("before")
    srv.run("ldapadd", input=person(first, password=PASSWORD, bound=True), check=True)
    wait_synced(srv, f"uid={first},{PEOPLE}")

    # The admin's sessions are revoked (password change, "revoke sessions"): the refresh token is
    # refused (invalid_grant, AADSTS50173) and the access token Graph had accepted is no longer valid.
    assert fake_tenant.admin.revoke_refresh_tokens() >= 1
    fake_tenant.admin.expire_tokens()
    held = unique("held")
    held_dn = f"uid={held},{PEOPLE}"
    srv.run("ldapadd", input=person(held, password=PASSWORD, bound=True), check=True)
    st = wait_connector(srv, "needs-reauthorization")
    assert "o365 authorize" in st["o365LastError"][0] or "sign" in st["o365LastError"][0]
    # shown where an admin looks
    p = srv.cli("o365", "status")
    out = p.stdout.decode()
    assert p.returncode == 1 and "state: needs-reauthorization" in out, out
    assert "ldapsync o365 authorize" in out
    m = parse_ldif_output(srv.run("ldapsearch", "-LLL", "-b", MONITOR_CONNECTOR, "-s", "base", "(objectClass=*)",
                                  "*", "+", check=True).stdout)[MONITOR_CONNECTOR]
    assert m["monitoredInfo"] == ["needs-reauthorization"]
    status, body = http_get(port, "/readyz")
    assert status == 200 and json.loads(body)["connector"] == "needs-reauthorization"
    # the delivery waits: not in Microsoft 365, not in error, still queued
    e = entry(srv, held_dn)
    assert e["o365SyncState"] == ["pending"] and "o365LastError" not in e
    assert fake_tenant.admin.get_user(key=f"{held}@{DOMAIN}") is None
    assert re.search(r"queued changes: [1-9]\d* ready", out), out
    assert "0 stopped by an error" in out
    # the admin is told by mail, once: a later check (the CLI's, ended when it returns) sends no other
    mails = wait_for("the re-authorization notice", lambda: admin_mails(smtp_sink), 30)
    assert "needs an administrator to sign in again" in mails[0].message["Subject"]
    assert "ldapsync o365 authorize" in mails[0].body() and "AADSTS50173" in mails[0].body()
    p = srv.cli("o365", "reconcile")
    assert p.returncode != 0 and b"state: needs-reauthorization" in p.stdout, p.stdout + p.stderr
    assert len(admin_mails(smtp_sink)) == 1

    # The admin signs in again: the connector is active and the waiting change goes out.
    p = srv.cli("o365", "authorize")
    assert p.returncode == 0 and b"state: active" in p.stdout, p.stdout + p.stderr
    wait_connector(srv, "active")
    u = wait_for("the held user delivered", lambda: fake_tenant.admin.get_user(key=f"{held}@{DOMAIN}"), 90)
    assert u["accountEnabled"] is True
    assert fake_tenant.admin.password_of(key=f"{held}@{DOMAIN}") == PASSWORD
    wait_synced(srv, held_dn, 60)
    status, body = http_get(port, "/readyz")
    assert json.loads(body)["connector"] == "active"
    assert len(admin_mails(smtp_sink)) == 1

    # refused again later: the admin is told again
    assert fake_tenant.admin.revoke_refresh_tokens() >= 1
    fake_tenant.admin.expire_tokens()
    srv.run("ldapadd", input=person(unique("again"), password=PASSWORD, bound=True), check=True)
    wait_connector(srv, "needs-reauthorization")
    wait_for("a second notice", lambda: len(admin_mails(smtp_sink)) == 2, 30)


def test_expired_client_secret_needs_reauthorization_and_a_new_one_resumes(
        make_server: Any, fake_tenant: Any, smtp_sink: Any, tmp_path: Any) -> None:
    """Application sign-in: Entra refuses an expired client secret (AADSTS7000222). Only an admin can
    fix that (a new secret), so the state is needs-reauthorization, not a transient error; putting the
    new secret in place and running `ldapsync o365 authorize` resumes the RUNNING server's deliveries."""
    app = fake_tenant.admin.register_app(secret=True, secret_expires_at=time.time() - 60,
                                         permissions=["User.ReadWrite.All", "Domain.Read.All"])
    secret = tmp_path / "secret"
    secret.write_text(app["secret"] + "\n")
    info = dict(fake_tenant.info, client_id=app["client_id"], client_secret_file=str(secret))
    srv = make_server("sqlite", office365_config(info) + mail_config(smtp_sink))
    st = wait_connector(srv, "needs-reauthorization")
    assert "7000222" in st["o365LastError"][0] and "new client secret" in st["o365LastError"][0]
    assert app["secret"] not in st["o365LastError"][0] and app["secret"] not in srv.log.read_text()
    mails = wait_for("the re-authorization notice", lambda: admin_mails(smtp_sink), 30)
    assert "needs a new client secret or certificate" in mails[0].message["Subject"]
    held = unique("sec")
    srv.run("ldapadd", input=person(held, password=PASSWORD, bound=True), check=True)
    assert entry(srv, f"uid={held},{PEOPLE}")["o365SyncState"] == ["pending"]

    new = fake_tenant.admin.add_app_secret(client_id=app["client_id"])
    secret.write_text(new + "\n")
    p = srv.cli("o365", "authorize")
    assert p.returncode == 0 and b"state: active" in p.stdout, p.stdout + p.stderr
    u = wait_for("the held user delivered", lambda: fake_tenant.admin.get_user(key=f"{held}@{DOMAIN}"), 90)
    assert fake_tenant.admin.password_of(key=f"{held}@{DOMAIN}") == PASSWORD and u["accountEnabled"] is True
    wait_synced(srv, f"uid={held},{PEOPLE}", 60)
    assert connector_entry(srv)["o365ConnectorState"] == ["active"]
    assert len(admin_mails(smtp_sink)) == 1
