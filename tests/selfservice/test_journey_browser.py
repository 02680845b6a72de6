"""An employee's first day, end to end, in a real headless Chromium.

Real parts only: a twistd server (SQLite) with the Microsoft 365 connector on, the fake tenant
(HTTPS, real MSAL and Graph client), a real SMTP sink on loopback, ldap-utils, and Debian's
chromium driven through chromedriver.  Screenshots of every page land in tests/artifacts/.

The journey: a user imported from Microsoft 365 (sign-in blocked there) is bound → the activation
mail arrives → the link is followed in the browser → a weak password is refused with the rule →
a good one is set → `ldapwhoami` as the user works and the tenant got the password and enabled the
account → the link cannot be used again → the user signs in, fails the current-password check,
changes the password → forgets it and resets it by mail.  Then: expired and forged links, a re-sent
invitation, lockout on the sign-in page, an expired password changed at sign-in, the expiry warning
mail, CSRF and rate limits, and the headers that keep tokens out of caches and logs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import office365_config  # type: ignore[import-not-found]
from helpers import (
    PEOPLE,
    Client,
    add_user,
    link_in,
    mails_to,
    ssha,
    unique,
    wait_for,
    wait_mail,
    whoami,
)

pytestmark = pytest.mark.e2e

CONNECTOR = f"cn=office365,ou=directories,{PEOPLE.split(',', 1)[1]}"
GOOD = "Blue-Harbour-42"


@pytest.fixture(scope="module")
def tenant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from ldapsync.testing.client import FakeTenantProcess

    proc = FakeTenantProcess(tmp_path_factory.mktemp("tenant"))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from conftest import run_smtp_sink  # type: ignore[import-not-found]

    yield from run_smtp_sink(tmp_path_factory)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, tls_files: Any, tenant: Any, sink: Any) -> Iterator[Any]:
    from conftest import _make_server  # type: ignore[import-not-found]

    extra = office365_config(tenant.info) + f"""
[mail]
smtp = "tcp:127.0.0.1:{sink.port}"
from = "it@contoso.com"
admin_address = "helpdesk@contoso.com"
[selfservice]
expiry_check_interval = "1s"
rate_limit_user = 8
rate_limit_address = 60
[policy]
lockout_failures = 3
lockout_duration = "10m"
max_age = "90d"
expire_warning = "14d"
"""
    s, _ = _make_server(tmp_path_factory.mktemp("journey"), "sqlite", tls_files, extra)
    s.start()
    try:
        wait_for("connector active", lambda: "o365ConnectorState: active" in s.run(
            "ldapsearch", "-LLL", "-b", CONNECTOR, "-s", "base", "(objectClass=*)", "o365ConnectorState").stdout, 30)
        yield s
    finally:
        s.stop()


# -- the journey ---------------------------------------------------------------------------------------
def test_first_day_journey(srv: Any, tenant: Any, sink: Any, browser: Any) -> None:
    uid = unique("newhire")
    upn = f"{uid}@contoso.com"
    private = f"{uid}@home.example"
    # Imported from Microsoft 365, where sign-in is blocked until the user has a password.
    tenant.admin.add_user(upn=upn, display_name="Alex Newhire", enabled=False, mailNickname=uid, mail=upn,
                          givenName="Alex", surname="Newhire")
    p = srv.cli("o365", "import", "--user", upn)
    assert p.returncode == 0, p.stderr
    dn = f"uid={uid},{PEOPLE}"
    assert whoami(srv, dn, GOOD).returncode == 49             # inactive: no password yet
    # The admin binds the user (and records a private address for the activation mail).
    srv.run("ldapmodify", input=f"dn: {dn}\nchangetype: modify\nadd: ldapsyncDirectory\nldapsyncDirectory: office365\n-\n"
                                f"add: ldapsyncAltMail\nldapsyncAltMail: {private}\n", check=True)
    msg = wait_mail(sink, private)
    assert msg.message["Subject"] == "Activate your account"
    assert uid in msg.body() and upn in msg.body()
    assert f"You will sign in to Microsoft 365 as {upn}" in msg.body()        # bound: the promise holds
    link = link_in(msg)
    token = link.split("token=", 1)[1]
    # Pending invitation: visible to the admin as an operational attribute and in the CLI.
    got = srv.run("ldapsearch", "-LLL", "-b", dn, "-s", "base", "(objectClass=*)", "ldapsyncActivationExpires").stdout
    assert "ldapsyncActivationExpires: " in got
    listing = srv.cli("user", "invitations").stdout.decode()
    assert dn in listing and "activate" in listing and private in listing

    browser.get(link)
    assert browser.title == "Activate your account"
    assert uid in browser.text and upn in browser.text and "Microsoft 365" in browser.text
    assert "At least" in browser.text                         # the rules are shown before typing
    browser.shot("01-activate")
    browser.fill(new="weakpass", confirm="weakpass")
    browser.submit()
    assert "3 of" in browser.alert() or "lowercase" in browser.alert(), browser.alert()
    browser.shot("02-activate-weak-password")
    browser.fill(new=GOOD, confirm=GOOD + "x")
    browser.submit()
    assert "not the same" in browser.alert()
    browser.fill(new=GOOD, confirm=GOOD)
    browser.submit()
    assert browser.title == "Your account is active"
    assert uid in browser.text
    browser.shot("03-activated")

    # Active in the directory...
    p = whoami(srv, dn, GOOD)
    assert p.returncode == 0 and p.stdout.strip() == f"dn:{dn}", p.stderr
    # ...and in Microsoft 365: the chosen password, sign-in enabled, no forced change.
    wait_for("password in Microsoft 365", lambda: tenant.admin.password_of(key=upn) == GOOD, 30)
    u = tenant.admin.get_user(key=upn)
    assert u["accountEnabled"] is True
    assert u["passwordProfile"]["forceChangePasswordNextSignIn"] is False
    got = srv.run("ldapsearch", "-LLL", "-b", dn, "-s", "base", "(objectClass=*)", "ldapsyncActivationExpires",
                  "pwdChangedTime").stdout
    assert "ldapsyncActivationExpires" not in got and "pwdChangedTime: " in got
    assert dn not in srv.cli("user", "invitations").stdout.decode()

    # The link worked once.
    browser.get(link)
    assert browser.title == "This link has already been used"
    browser.shot("04-link-already-used")

    # The token never reaches a log line (the access log shows the path only).
    assert token not in srv.log.read_text()

    # Signed in: the account page, a wrong current password, then a change.
    browser.get(srv.web_url + "/signin")
    browser.shot("05-sign-in")
    browser.fill(username=uid, password=GOOD)
    browser.submit()
    assert browser.title == "Your account"
    assert "Password expires" in browser.text
    browser.shot("06-account")
    second = "Green-Valley-77"
    browser.fill(current="Wrong-Guess-11", new=second, confirm=second)
    browser.submit()
    assert browser.alert() == "Your current password is not correct."
    browser.fill(current=GOOD, new=GOOD, confirm=GOOD)
    browser.submit()
    assert "used recently" in browser.alert() or "last" in browser.alert(), browser.alert()
    browser.fill(current=GOOD, new=second, confirm=second)
    browser.submit()
    assert "has been changed" in browser.text
    browser.shot("07-password-changed")
    assert whoami(srv, dn, second).returncode == 0
    assert whoami(srv, dn, GOOD).returncode == 49
    wait_for("changed password in Microsoft 365", lambda: tenant.admin.password_of(key=upn) == second, 30)
    from selenium.webdriver.common.by import By

    browser.click(browser.driver.find_element(By.CSS_SELECTOR, "button.link"))     # "Sign out"
    assert browser.title == "Sign in"

    # Forgotten: the reset link goes by mail, the new password works everywhere.
    browser.get(srv.web_url + "/forgot")
    browser.shot("08-forgot")
    browser.fill(username=upn)
    browser.submit()
    assert browser.title == "Check your e-mail"
    browser.shot("09-forgot-sent")
    reset = wait_mail(sink, private, 2)
    assert reset.message["Subject"] == "Reset your password"
    browser.get(link_in(reset))
    assert browser.title == "Choose a new password"
    browser.shot("10-reset")
    third = "Quiet-Meadow-93"
    browser.fill(new=third, confirm=third)
    browser.submit()
    assert browser.title == "Your password has been changed"
    assert whoami(srv, dn, third).returncode == 0
    wait_for("reset password in Microsoft 365", lambda: tenant.admin.password_of(key=upn) == third, 30)


def test_created_unbound_user_gets_activation_and_account_is_enabled(srv: Any, tenant: Any, sink: Any, browser: Any) -> None:
    """Bound before any password: created in Microsoft 365 with sign-in blocked, then activated."""
    uid = unique("fresh")
    upn = f"{uid}@contoso.com"
    dn = add_user(srv, uid, bound=True)                       # no alternate address: mail goes to `mail`
    msg = wait_mail(sink, upn)
    wait_for("account created", lambda: tenant.admin.get_user(key=upn) is not None, 30)
    assert tenant.admin.get_user(key=upn)["accountEnabled"] is False
    browser.clear_cookies()
    browser.get(link_in(msg))
    browser.fill(new=GOOD, confirm=GOOD)
    browser.submit()
    assert browser.title == "Your account is active"
    assert whoami(srv, dn, GOOD).returncode == 0
    wait_for("enabled with the password", lambda: tenant.admin.password_of(key=upn) == GOOD
             and tenant.admin.get_user(key=upn)["accountEnabled"] is True, 30)


def test_bound_with_only_a_hash_gets_a_welcome_and_sign_in_hands_the_password_over(
        srv: Any, tenant: Any, sink: Any, browser: Any) -> None:
    """README, "Self-service": a user bound while the directory holds only a hash gets a new account with
    sign-in blocked and a mail; the next self-service sign-in pushes the password and enables it."""
    uid = unique("hashonly")
    upn = f"{uid}@contoso.com"
    # only a hash (a cleartext set while unbound would be kept for unbound_password_ttl and pushed
    # at the binding: no welcome needed then, see tests/sync/test_unbound_passwords.py)
    dn = add_user(srv, uid, password=ssha(GOOD), alt=f"{uid}@home.example")   # active, not bound
    srv.run("ldapmodify", input=f"dn: {dn}\nchangetype: modify\nadd: ldapsyncDirectory\nldapsyncDirectory: office365\n",
            check=True)
    msg = wait_mail(sink, f"{uid}@home.example")
    assert msg.message["Subject"] == "Your Microsoft 365 account is ready"
    assert "/signin" in msg.body() and "token=" not in msg.body()
    u = tenant.admin.get_user(key=upn)
    assert u["accountEnabled"] is False and tenant.admin.password_of(key=upn) != GOOD
    assert dn not in srv.cli("user", "invitations").stdout.decode()      # nothing left to use
    browser.clear_cookies()
    browser.get(srv.web_url + "/signin")
    browser.fill(username=uid, password=GOOD)
    browser.submit()
    assert browser.title == "Your account"
    wait_for("password handed to Microsoft 365", lambda: tenant.admin.password_of(key=upn) == GOOD
             and tenant.admin.get_user(key=upn)["accountEnabled"] is True, 30)


def test_expired_forged_and_replaced_links(srv: Any, sink: Any, browser: Any) -> None:
    uid = unique("late")
    dn = add_user(srv, uid, alt=f"{uid}@home.example")
    p = srv.cli("user", "invite", dn)
    assert p.returncode == 0, p.stderr
    assert f"{uid}@home.example" in p.stdout.decode()
    first_mail = wait_mail(sink, f"{uid}@home.example")
    # Not bound: neither the mail nor the page promises a Microsoft 365 sign-in.
    assert "Microsoft 365" not in first_mail.body()
    first_link = link_in(first_mail)
    browser.get(first_link)
    assert browser.title == "Activate your account" and "Microsoft 365" not in browser.text
    # Forged: a token that was never issued.
    browser.get(srv.web_url + "/activate?token=" + "A" * 43)
    assert browser.title == "This link is not valid"
    browser.shot("11-link-forged")
    # A reset token does not work on the activation page and vice versa.
    browser.get(first_link.replace("/activate?", "/reset?"))
    assert browser.title == "This link is not valid"
    # 73 hours later the link has expired.
    srv.advance_clock(73 * 3600)
    browser.get(first_link)
    assert browser.title == "This link has expired"
    browser.shot("12-link-expired")
    listing = srv.cli("user", "invitations").stdout.decode()
    assert dn in listing and "expired" in listing
    # The admin re-sends: the new link works, the old one says it was replaced.
    assert srv.cli("user", "invite", dn).returncode == 0
    second_link = link_in(wait_mail(sink, f"{uid}@home.example", 2))
    browser.get(first_link)
    assert browser.title == "This link has been replaced"
    browser.get(second_link)
    assert browser.title == "Activate your account"
    # A user who already has a password cannot be invited.
    active = add_user(srv, unique("active"), password=GOOD)
    p = srv.cli("user", "invite", active)
    assert p.returncode == 1 and b"already has a password" in p.stderr


def test_lockout_and_expired_password_on_the_sign_in_page(srv: Any, sink: Any, browser: Any) -> None:
    uid = unique("lock")
    dn = add_user(srv, uid, password=GOOD, alt=f"{uid}@home.example")
    browser.clear_cookies()
    for _ in range(3):
        browser.get(srv.web_url + "/signin")
        browser.fill(username=uid, password="Not-The-One-1")
        browser.submit()
        assert "not correct" in browser.alert() or "locked" in browser.alert()
    browser.fill(username=uid, password=GOOD)
    browser.submit()
    assert "locked" in browser.alert()
    browser.shot("13-locked")
    assert whoami(srv, dn, GOOD).returncode == 49            # LDAP agrees: locked
    srv.advance_clock(11 * 60)                                # lockout_duration is 10 minutes
    assert whoami(srv, dn, GOOD).returncode == 0

    # 77 days later (13 days before expiry): one warning mail, not two.  "Not two" is checked
    # once a later pass has warned another user, whose password was set 2 days after this one's.
    srv.advance_clock(2 * 86400)
    later = unique("lock")
    add_user(srv, later, password=GOOD, alt=f"{later}@home.example")
    srv.advance_clock(75 * 86400)
    warn = wait_mail(sink, f"{uid}@home.example", 1, timeout=30)
    assert warn.message["Subject"].startswith("Your password expires in 13 day")
    assert mails_to(sink, f"{later}@home.example") == []     # not due yet: 15 days before its expiry
    srv.advance_clock(2 * 86400)
    assert wait_mail(sink, f"{later}@home.example", 1, timeout=30).message["Subject"].startswith(
        "Your password expires in 13 day")
    assert len(mails_to(sink, f"{uid}@home.example")) == 1
    # After 90 days the password has expired: LDAP refuses it, the page lets the user change it.
    srv.advance_clock(14 * 86400)
    assert whoami(srv, dn, GOOD).returncode == 49
    browser.get(srv.web_url + "/signin")
    browser.fill(username=uid, password=GOOD)
    browser.submit()
    assert browser.title == "Your account"
    assert "has expired" in browser.alert()
    browser.shot("14-password-expired")
    new = "Fresh-Spring-2027"
    browser.fill(current=GOOD, new=new, confirm=new)
    browser.submit()
    assert "has been changed" in browser.text
    assert whoami(srv, dn, new).returncode == 0


def test_forms_refuse_forged_requests_and_floods(srv: Any) -> None:
    c = Client(srv.web_url)
    status, headers, _ = c.request("/signin")
    assert status == 200
    assert headers["cache-control"] == "no-store" and headers["referrer-policy"] == "same-origin"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert "HttpOnly" in headers["set-cookie"] and "SameSite=strict" in headers["set-cookie"]
    # No CSRF field, a field from another browser, a foreign Origin: all refused before any check.
    assert c.request("/signin", {"username": "x", "password": "y"})[0] == 403
    other = Client(srv.web_url)
    assert c.request("/signin", {"username": "x", "password": "y", "csrf": other.csrf("/signin")})[0] == 403
    token = c.csrf("/signin")
    assert c.request("/signin", {"username": "x", "password": "y", "csrf": token},
                     headers={"Origin": "https://evil.example"})[0] == 403
    assert c.request("/signin", {"username": "x", "password": "y", "csrf": token})[0] == 401
    # The forgotten-password form answers the same for unknown users, and is rate-limited per user.
    login = unique("nobody")
    codes = [c.request("/forgot", {"username": login, "csrf": token})[0] for _ in range(9)]
    assert codes[:8] == [200] * 8 and codes[8] == 429, codes
    # Unknown pages and methods.
    assert c.request("/nope")[0] == 404
    assert c.request("/account", {"csrf": token})[0] == 303      # not signed in
    assert c.request("/activate?token=%00%ff")[0] == 404


def test_activation_without_javascript_using_only_the_keyboard(srv: Any, sink: Any, browser_nojs: Any) -> None:
    """No JavaScript, no mouse: Tab between the labelled fields and Enter to submit."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    b = browser_nojs
    b.get("data:text/html,<title>off</title><script>document.title='on'</script>")
    assert b.driver.title == "off"                                # page scripts really do not run
    uid = unique("keys")
    dn = add_user(srv, uid, alt=f"{uid}@home.example")
    assert srv.cli("user", "invite", dn).returncode == 0
    b.get(link_in(wait_mail(sink, f"{uid}@home.example")))
    assert b.title == "Activate your account"
    # Every input has a label pointing at it, and the page declares its language.
    assert b.driver.find_element(By.TAG_NAME, "html").get_attribute("lang") == "en"
    for inp in b.driver.find_elements(By.CSS_SELECTOR, "main input:not([type=hidden]):not([hidden])"):
        assert b.driver.find_elements(By.CSS_SELECTOR, f"label[for='{inp.get_attribute('id')}']"), inp.get_attribute("name")
    focused = b.driver.switch_to.active_element                      # autofocus: the new-password field
    assert focused.get_attribute("name") == "new"
    focused.send_keys(GOOD, Keys.TAB)
    second = b.driver.switch_to.active_element
    assert second.get_attribute("name") == "confirm"
    old = b.driver.find_element(By.TAG_NAME, "html")
    second.send_keys(GOOD, Keys.ENTER)
    b.wait_replaced(old)
    assert b.title == "Your account is active"
    assert whoami(srv, dn, GOOD).returncode == 0
