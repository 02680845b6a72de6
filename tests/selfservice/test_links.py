"""Activation and reset links on both databases (no browser: a plain HTTP client plays the user),
plus unit tests of the signed cookies, CSRF tokens and rate limits."""

from __future__ import annotations

import re
import signal
import sqlite3
from typing import Any

import pytest
from helpers import (
    PEOPLE,
    Client,
    add_user,
    link_in,
    unique,
    wait_for,
    wait_mail,
    whoami,
)

from ldapsync.selfservice.security import RateLimiter, Session, Signer

GOOD = "Amber-Lantern-58"


# -- units ----------------------------------------------------------------------------------------
def test_session_cookie_round_trip_tamper_and_expiry() -> None:
    s = Signer(b"k" * 32)
    cookie = s.session_cookie(Session("uid=a,ou=people,dc=example,dc=com", 1000.0, must_change=True))
    assert s.read_session(cookie, 999.0) == Session("uid=a,ou=people,dc=example,dc=com", 1000.0, True)
    assert s.read_session(cookie, 1000.0) is None                       # expired
    body, mac = cookie.split(".")
    forged = Signer(b"x" * 32).session_cookie(Session("cn=admin,dc=example,dc=com", 5000.0))
    assert s.read_session(forged, 0) is None                            # another key
    assert s.read_session(body[:-2] + "AA." + mac, 0) is None           # changed body
    for junk in ("", ".", "a.b", "x" * 5000, None):
        assert s.read_session(junk, 0) is None


def test_csrf_field_is_bound_to_the_cookie() -> None:
    s = Signer(b"k" * 32)
    c1, c2 = s.new_csrf_cookie(), s.new_csrf_cookie()
    assert c1 != c2
    assert s.csrf_ok(c1, s.csrf_field(c1))
    assert not s.csrf_ok(c2, s.csrf_field(c1))
    assert not s.csrf_ok(None, s.csrf_field(c1)) and not s.csrf_ok(c1, None) and not s.csrf_ok(c1, "")


def test_rate_limiter_sliding_window() -> None:
    r = RateLimiter(limit=3, window=60)
    assert [r.retry_after("a", t) for t in (0, 1, 2)] == [0, 0, 0]
    assert r.retry_after("a", 3) == 57                                   # until the first attempt leaves
    assert r.retry_after("b", 3) == 0                                    # other keys unaffected
    assert r.retry_after("a", 60.5) == 0                                 # the first one left the window
    small = RateLimiter(limit=1, window=10, max_keys=4)
    for i in range(10):                                                 # memory stays bounded
        small.retry_after(f"k{i}", float(i * 20))
    assert len(small._hits) <= 4


def test_only_a_hash_of_the_token_is_stored(tmp_path: Any) -> None:
    from ldapsync.selfservice.links import hash_token

    assert hash_token("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert re.fullmatch(r"[0-9a-f]{64}", hash_token("x" * 43))


def test_a_link_opened_before_its_send_is_recorded_works_once(tmp_path: Any) -> None:
    """The mail can arrive, and its link be opened, before the sender has marked the link sent
    (CI caught a 410 "replaced" for a fresh link on PostgreSQL): a queued link with its token
    issued is usable, once, and the late "sent" does not reopen it."""
    from ldapsync.store import links as q
    from ldapsync.store.database import Database

    db = Database(f"sqlite:///{tmp_path / 'l.db'}")
    db.create_schema()
    try:
        lid = db.run_sync("queue", q.queue_txn, "uuid-1", q.ACTIVATE, 100.0)
        db.run_sync("issue", q.issue_txn, lid, "h" * 64, 200.0)
        row = db.run_sync("find", q.find_by_hash_txn, "h" * 64, write=False)
        assert row is not None and row.state == q.QUEUED and row.state in q.USABLE
        assert db.run_sync("use", q.use_txn, lid, 150.0)
        assert not db.run_sync("use again", q.use_txn, lid, 151.0)
        assert not db.run_sync("sent, late", q.mark_sent_txn, lid, 152.0, "u@home.example")
        row = db.run_sync("find", q.find_by_hash_txn, "h" * 64, write=False)
        assert row is not None and row.state == q.USED
        other = db.run_sync("queue", q.queue_txn, "uuid-2", q.ACTIVATE, 100.0)
        assert not db.run_sync("use, no token", q.use_txn, other, 150.0)       # never mailed
    finally:
        db.stop()


# -- end to end, both databases --------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_invite_activate_and_reset_over_http(backend: str, make_server: Any, smtp_sink: Any) -> None:
    srv = make_server(backend, f"""
[mail]
smtp = "{smtp_sink.endpoint}"
""")
    uid = unique("http")
    dn = add_user(srv, uid, alt=f"{uid}@home.example")
    p = srv.cli("user", "invite", dn)
    assert p.returncode == 0, p.stderr
    link = link_in(wait_mail(smtp_sink, f"{uid}@home.example"))
    path = link.split("/", 3)[3]
    token = link.split("token=")[1]
    c = Client(srv.web_url)
    status, headers, page = c.request("/" + path)
    assert status == 200 and "Activate your account" in page and headers["cache-control"] == "no-store"
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    status, _, page = c.request("/activate", {"token": token, "new": "short", "confirm": "short", "csrf": csrf})
    assert status == 422 and "at least 8" in page.lower()
    status, _, page = c.request("/activate", {"token": token, "new": GOOD, "confirm": GOOD, "csrf": csrf})
    assert status == 200 and "Your account is active" in page
    assert whoami(srv, dn, GOOD).returncode == 0
    # Used once: a second POST changes nothing.
    status, _, page = c.request("/activate", {"token": token, "new": GOOD + "2", "confirm": GOOD + "2", "csrf": csrf})
    assert status == 410 and "already been used" in page
    assert whoami(srv, dn, GOOD).returncode == 0
    # Forgotten password for an active user: a reset link, to the alternate address.
    status, _, page = c.request("/forgot", {"username": uid, "csrf": csrf})
    assert status == 200
    reset = wait_mail(smtp_sink, f"{uid}@home.example", 2)
    assert reset.message["Subject"] == "Reset your password"
    rtoken = link_in(reset).split("token=")[1]
    status, _, page = c.request("/reset", {"token": rtoken, "new": GOOD, "confirm": GOOD, "csrf": csrf})
    assert status == 422 and "recently" in page                        # history: the current password
    status, _, page = c.request("/reset", {"token": rtoken, "new": "Other-Lantern-59", "confirm": "Other-Lantern-59",
                                           "csrf": csrf})
    assert status == 200 and "has been changed" in page
    assert whoami(srv, dn, "Other-Lantern-59").returncode == 0
    # An unknown user: the same answer, no mail.
    before = len(smtp_sink.messages())
    status, _, page = c.request("/forgot", {"username": unique("ghost"), "csrf": csrf})
    assert status == 200 and "If an account matches" in page
    assert len(smtp_sink.messages()) == before
    assert token not in srv.log.read_text() and rtoken not in srv.log.read_text()
    if backend == "sqlite":
        db = srv.db_url.split("///", 1)[1]
        with sqlite3.connect(db) as conn:
            hashes = [r[0] for r in conn.execute("SELECT token_hash FROM selfservice_links")]
        assert token not in hashes and all(h is None or len(h) == 64 for h in hashes)


@pytest.mark.e2e
def test_failed_mail_is_kept_shown_and_retried(make_server: Any, smtp_sink: Any) -> None:
    """The SMTP server is down: the link stays queued with the error shown by the CLI, and is mailed
    once the server is back; a user deleted meanwhile gets nothing."""
    from conftest import free_port  # type: ignore[import-not-found]

    srv = make_server("sqlite", f"""
[mail]
smtp = "tcp:127.0.0.1:{free_port()}"
""")
    uid = unique("retry")
    dn = add_user(srv, uid)
    assert dn == f"uid={uid},{PEOPLE}"
    assert srv.cli("user", "invite", dn).returncode == 0
    wait_for("send error shown", lambda: "last error" in srv.cli("user", "invitations").stdout.decode(), 30)
    gone = add_user(srv, unique("gone"))
    assert srv.cli("user", "invite", gone).returncode == 0
    srv.run("ldapdelete", gone, check=True)
    listing = srv.cli("user", "invitations").stdout.decode()
    assert dn in listing and gone not in listing                     # deleting the user revoked its link
    # The mail server is back (the server restarts with it); the retry is due 30 s later.
    srv.extra_config = f'[mail]\nsmtp = "{smtp_sink.endpoint}"\n'
    srv.restart()
    srv.advance_clock(31)
    msg = wait_mail(smtp_sink, f"{uid}@contoso.com")
    assert msg.message["Subject"] == "Activate your account"
    assert "sent" in srv.cli("user", "invitations").stdout.decode()
    assert not [m for m in smtp_sink.messages() if any("gone" in r for r in m.rcpt_to)]


@pytest.mark.e2e
def test_https_deployment_cookies_and_per_address_limit(make_server: Any) -> None:
    """Behind a TLS proxy (public_url https://): Secure cookies and HSTS; the per-address limit."""
    srv = make_server("sqlite", """
[selfservice]
public_url = "https://account.example.com"
rate_limit_address = 3
""")
    c = Client(srv.web_url)
    status, headers, page = c.request("/signin")
    assert status == 200 and "Secure" in headers["set-cookie"] and "HttpOnly" in headers["set-cookie"]
    assert headers["strict-transport-security"].startswith("max-age=")
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    # A Secure cookie is not sent back over plain HTTP by a client: hand it over as the proxy would.
    cookie = re.search(r"ls_csrf=([^;]+)", headers["set-cookie"]).group(1)  # type: ignore[union-attr]
    origin = {"Origin": "https://account.example.com", "Cookie": f"ls_csrf={cookie}"}
    codes = [c.request("/forgot", {"username": unique("x"), "csrf": token}, headers=origin)[0] for _ in range(4)]
    assert codes == [200, 200, 200, 429], codes
    status, headers, page = c.request("/forgot", {"username": "y", "csrf": token}, headers=origin)
    assert status == 429 and int(headers["retry-after"]) > 0 and "Too many attempts" in page
    # The page's own origin differs from public_url here, so a browser's POST is refused: the
    # server only accepts forms coming from the address users are given.
    status, _, page = c.request("/forgot", {"username": "y", "csrf": token},
                                headers={"Origin": srv.web_url, "Cookie": f"ls_csrf={cookie}"})
    assert status == 403
    # ...and the page says why, where the person setting it up looks (not only in the log).
    assert "opened at another address" in page and "https://account.example.com/signin" in page
    assert srv.web_url.lower() in page and "[selfservice] public_url" in page


@pytest.mark.e2e
def test_two_nodes_mail_each_link_once_and_share_sessions(make_cluster: Any, smtp_sink: Any) -> None:
    """Two server processes on one PostgreSQL database: a queued link is mailed by exactly one node,
    a link mailed by one node works on the other, and either node accepts the other's session."""
    a, b = make_cluster(2, f'[mail]\nsmtp = "{smtp_sink.endpoint}"\n')
    uids = [unique("pair") for _ in range(6)]
    dns = [add_user(a, uid) for uid in uids]
    for dn in dns:
        assert a.cli("user", "invite", dn).returncode == 0
    for uid in uids:
        wait_mail(smtp_sink, f"{uid}@contoso.com")
    # "Once" is checked after each node has mailed a link queued after these (so each has claimed
    # from the queue since): one more invitation while the other node is frozen, for each node.
    for mailer, frozen in ((b, a), (a, b)):
        frozen.signal_all(signal.SIGSTOP)
        try:
            later = unique("later")
            assert mailer.cli("user", "invite", add_user(mailer, later)).returncode == 0
            wait_mail(smtp_sink, f"{later}@contoso.com")
        finally:
            frozen.signal_all(signal.SIGCONT)
    for uid in uids:
        assert len([m for m in smtp_sink.messages() if f"{uid}@contoso.com" in m.rcpt_to]) == 1, uid
    both = "\n".join(srv.log.read_text() for srv in (a, b))
    assert both.count("activate link mailed") >= len(uids)
    # Mailed by whichever node; used on node b.
    link = link_in(wait_mail(smtp_sink, f"{uids[0]}@contoso.com"))
    token = link.split("token=")[1]
    c = Client(b.web_url)
    csrf = c.csrf("/activate?token=" + token)
    status, _, page = c.request("/activate", {"token": token, "new": GOOD, "confirm": GOOD, "csrf": csrf})
    assert status == 200 and "Your account is active" in page
    # Sign in on b; the session cookie works on a (same [secrets] key).
    status, headers, _ = c.request("/signin", {"username": uids[0], "password": GOOD, "csrf": c.csrf("/signin")})
    assert status == 303 and headers["location"] == "/account"
    session = re.search(r"ls_session=([^;]+)", headers["set-cookie"]).group(1)  # type: ignore[union-attr]
    status, _, page = Client(a.web_url).request("/account", headers={"Cookie": f"ls_session={session}"})
    assert status == 200 and uids[0] in page and "Password expires" in page


@pytest.mark.e2e
def test_a_busy_port_stops_the_server_with_one_clear_line(make_server: Any) -> None:
    import socket
    import subprocess

    from conftest import BIN  # type: ignore[import-not-found]

    srv = make_server("sqlite", start=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", srv.web_port))
        busy.listen()
        p = subprocess.run([str(BIN / "twistd"), "-n", "--pidfile=", "ldapsync", "--config", str(srv.config_path)],
                           cwd=srv.workdir, capture_output=True, text=True, timeout=60, check=False)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    assert f"cannot listen on 'tcp:{srv.web_port}:interface=127.0.0.1' ([selfservice] listen): Address already in use" in out
    assert "Traceback" not in out
