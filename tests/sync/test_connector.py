"""The connector lifecycle against the fake tenant (real MSAL, real Graph client, HTTPS), seen over LDAP."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from helpers import PEOPLE, SUFFIX, parse_ldif_output, unique, user_ldif

from conftest import office365_config  # type: ignore[import-not-found]

pytestmark = pytest.mark.e2e
CONNECTOR = f"cn=office365,ou=directories,{SUFFIX}"
TAG = f"cn=Provisioning - Office 365,ou=tags,{SUFFIX}"


def connector_state(srv) -> dict[str, list[str]]:
    p = srv.run("ldapsearch", "-LLL", "-b", CONNECTOR, "-s", "base", "(objectClass=*)", "+")
    assert p.returncode == 0, p.stderr
    return parse_ldif_output(p.stdout)[CONNECTOR]


def wait_state(srv, want: str, timeout: float = 30.0) -> dict[str, list[str]]:
    deadline = time.monotonic() + timeout
    st: dict[str, list[str]] = {}
    while time.monotonic() < deadline:
        p = srv.run("ldapsearch", "-LLL", "-b", CONNECTOR, "-s", "base", "(objectClass=*)", "+")
        if p.returncode == 0:
            st = parse_ldif_output(p.stdout).get(CONNECTOR, {})
            if st.get("o365ConnectorState") == [want]:
                return st
        time.sleep(0.3)
    raise AssertionError(f"connector state never became {want}: {st}")


def test_application_mode_active_with_domains_and_tag(make_server, fake_tenant):
    srv = make_server("sqlite", office365_config(fake_tenant.info))
    st = wait_state(srv, "active")
    assert set(st["o365VerifiedDomain"]) == {"contoso.onmicrosoft.com", "contoso.com"}
    assert st["o365AuthMode"] == ["application (custom authority)"]
    assert "o365LastSuccess" in st and "o365LastError" not in st
    # the system group exists and cannot be deleted while enabled
    p = srv.run("ldapsearch", "-LLL", "-b", TAG, "-s", "base", "(objectClass=ldapsyncTag)", "cn")
    assert TAG in parse_ldif_output(p.stdout)
    p = srv.run("ldapdelete", TAG)
    assert p.returncode == 53 and "cannot be deleted while the connector is enabled" in p.stderr
    # users can be tagged (an empty tag and a tag with members are both valid)
    uid = unique()
    srv.run("ldapadd", input=user_ldif(uid, domain="contoso.com"), check=True)
    srv.run("ldapmodify", input=f"dn: {TAG}\nchangetype: modify\nadd: member\nmember: uid={uid},{PEOPLE}\n", check=True)
    # binding a user whose mail is on a domain the tenant has not verified is refused
    other = unique()
    srv.run("ldapadd", input=user_ldif(other), check=True)
    p = srv.run("ldapmodify", input=f"dn: {TAG}\nchangetype: modify\nadd: member\nmember: uid={other},{PEOPLE}\n")
    assert p.returncode == 19 and 'mail domain "example.com" is not a verified domain' in p.stderr
    # the state attributes are read-only to clients
    p = srv.run("ldapmodify", input=f"dn: {CONNECTOR}\nchangetype: modify\nreplace: o365ConnectorState\no365ConnectorState: active\n")
    assert p.returncode == 19
    # the real Graph client talked to the fake tenant
    paths = [r["path"] for r in fake_tenant.admin.requests(kind="graph")]
    assert any(p.endswith("/domains") for p in paths)


def test_wrong_secret_shows_error_and_ldap_keeps_serving(make_server, fake_tenant, tmp_path):
    bad = tmp_path / "bad-secret"
    bad.write_text("not-the-secret\n")
    info = dict(fake_tenant.info, client_secret_file=str(bad))
    srv = make_server("sqlite", office365_config(info))
    st = wait_state(srv, "error")
    assert "sign-in failed" in st["o365LastError"][0]
    assert "not-the-secret" not in srv.log.read_text() and "not-the-secret" not in st["o365LastError"][0]
    assert srv.run("ldapwhoami").returncode == 0
    p = srv.cli("o365", "status")
    assert p.returncode == 1 and b"state: error" in p.stdout


def test_tenant_outage_is_an_error_state_not_a_crash(make_server, fake_tenant):
    fake_tenant.admin.outage(seconds=None, mode="503")
    srv = make_server("sqlite", office365_config(fake_tenant.info))
    st = wait_state(srv, "error", timeout=90)
    assert st["o365LastError"]
    assert srv.run("ldapwhoami").returncode == 0
    fake_tenant.admin.end_outage()
    p = srv.cli("o365", "authorize")
    assert p.returncode == 0, p.stdout + p.stderr
    assert connector_state(srv)["o365ConnectorState"] == ["active"]


def test_delegated_device_code_sign_in_and_deactivate_reactivate(make_server, fake_tenant):
    srv = make_server("postgresql", office365_config(fake_tenant.info, auth="delegated"), start=False)
    assert srv.cli("init").returncode == 0         # only init creates the database
    p = srv.cli("o365", "authorize")
    out = p.stdout.decode()
    assert p.returncode == 0, out + p.stderr.decode()
    assert "devicelogin" in out and "state: active" in out
    # the refresh token is stored encrypted: no token material in clear in the database
    import sqlalchemy as sa

    eng = sa.create_engine(srv.db_url)
    with eng.connect() as c:
        blob = c.exec_driver_sql("SELECT value FROM meta WHERE key = 'o365.token_cache'").scalar_one()
    eng.dispose()
    assert "refresh_token" not in blob and "RefreshToken" not in blob
    srv.start()
    st = wait_state(srv, "active")
    assert "o365CredentialExpiry" in st        # 90 days from the sign-in

    uid = unique()
    srv.run("ldapadd", input=user_ldif(uid, extra="ldapsyncDirectory: office365\n", domain="contoso.com"), check=True)
    srv.run("ldapmodify", input=f"dn: {TAG}\nchangetype: modify\nadd: member\nmember: uid={uid},{PEOPLE}\n", check=True)
    p = srv.cli("o365", "deactivate")               # no TTY, no --yes: refused
    assert p.returncode != 0 and b"--yes" in p.stderr
    p = srv.cli("o365", "deactivate", "--yes")
    assert p.returncode == 0, p.stderr
    e = parse_ldif_output(srv.run("ldapsearch", "-LLL", "-b", f"uid={uid},{PEOPLE}", "-s", "base", "(objectClass=*)",
                                  "ldapsyncDirectory", "memberOf").stdout)[f"uid={uid},{PEOPLE}"]
    assert "ldapsyncDirectory" not in e and "memberOf" not in e
    wait_state(srv, "deactivated")
    p = srv.cli("o365", "reactivate")
    assert p.returncode == 0, p.stdout + p.stderr
    assert b"no user was unbound" in p.stdout


def test_expiry_reminder_mail_once(make_server, fake_tenant, smtp_sink, tmp_path):
    soon_dt = datetime.now(timezone.utc) + timedelta(days=3)
    soon = soon_dt.isoformat()
    app = fake_tenant.admin.register_app(secret=True, secret_expires_at=soon_dt.timestamp(),
                                         permissions=["User.ReadWrite.All", "Domain.Read.All", "Application.Read.All"])
    secret = tmp_path / "secret"
    secret.write_text(app["secret"] + "\n")
    info = dict(fake_tenant.info, client_id=app["client_id"], client_secret_file=str(secret))
    cfg = office365_config(info) + f'[mail]\nsmtp = "{smtp_sink.endpoint}"\nadmin_address = "it@example.com"\n'
    srv = make_server("sqlite", cfg)
    st = wait_state(srv, "active")
    assert st["o365CredentialExpiry"][0].startswith(soon[:10].replace("-", ""))
    msgs = smtp_sink.wait_for(1)
    assert "expires soon" in msgs[0].message["Subject"]
    assert "it@example.com" in msgs[0].rcpt_to
    assert app["secret"] not in msgs[0].body()
    # a later check (CLI authorize runs one) does not send a second reminder: the CLI has ended,
    # and the sink stores a mail before it answers the DATA, so one it sent would be there now
    p = srv.cli("o365", "authorize")
    assert p.returncode == 0 and b"active" in p.stdout, p.stdout + p.stderr
    assert len(smtp_sink.messages()) == 1
