"""Security of the self-service pages against a really listening server (issue 15).

Real parts only: a twistd server (SQLite), a real SMTP sink, raw sockets and ``http.client`` as
the attacker and as the innocent client, ldap-utils for the directory's view.  What is checked:

- ``/forgot`` mails only active users and users with a pending invitation, and answers the same
  page whatever the case (no account-existence oracle);
- request bodies are limited while they stream (a chunked 200 MB POST gets 413 after a few
  KiB, the server's memory stays put, and another client is served meanwhile);
- slowloris connections (request line and headers trickled, a form trickled, nothing sent at
  all) are closed after ``request_timeout`` / ``idle_timeout``; connections per address are capped;
- ``X-Forwarded-For`` picks the rate-limit key only when the TCP peer is a trusted proxy;
- signing out or changing the password ends the user's other sessions; wrong current passwords
  on ``/account`` count towards the directory's lockout.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import (
    Client,
    add_user,
    link_in,
    mails_to,
    unique,
    wait_for,
    wait_mail,
    whoami,
)

pytestmark = pytest.mark.e2e

GOOD = "Quiet-Meadow-73"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from conftest import run_smtp_sink  # type: ignore[import-not-found]

    yield from run_smtp_sink(tmp_path_factory)


def _module_server(tmp_path_factory: pytest.TempPathFactory, tls_files: Any, sink: Any, backend: str) -> Iterator[Any]:
    from conftest import _make_server, drop_pg_database  # type: ignore[import-not-found]

    s, pg_name = _make_server(tmp_path_factory.mktemp(f"secweb-{backend}"), backend, tls_files, f"""
[mail]
smtp = "tcp:127.0.0.1:{sink.port}"
[selfservice]
rate_limit_address = 1000
rate_limit_user = 100
request_timeout = "2s"
idle_timeout = "4s"
max_connections_per_address = 400
[policy]
lockout_failures = 3
lockout_duration = "10m"
""")
    s.start()
    try:
        yield s
    finally:
        s.stop()
        if pg_name:
            drop_pg_database(pg_name)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def srv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tls_files: Any,
        sink: Any) -> Iterator[Any]:
    """For what the database takes part in (links, sessions, lockout): once per backend."""
    yield from _module_server(tmp_path_factory, tls_files, sink, request.param)


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory, tls_files: Any, sink: Any) -> Iterator[Any]:
    """For the HTTP limits (no database involved): SQLite only."""
    yield from _module_server(tmp_path_factory, tls_files, sink, "sqlite")


# -- small raw-HTTP tools (what a browser would never do) ----------------------------------------------
def connect(srv: Any, source: str | None = None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.web_port), timeout=30,
                                 source_address=(source, 0) if source else None)
    return s


def read_status(sock: socket.socket) -> int:
    """The status code of the response on ``sock`` (reads until the status line is complete)."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"connection closed before a status line: {data!r}")
        data += chunk
    return int(data.split(b" ", 2)[1])


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed ``sock`` (EOF or reset); False while it is open."""
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def csrf_pair(srv: Any, path: str = "/forgot", source: str | None = None) -> tuple[str, str]:
    """(ls_csrf cookie, the form's csrf field) as a page hands them out."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.web_port, timeout=30,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        page = resp.read().decode()
        cookie = re.search(r"ls_csrf=([^;]+)", resp.getheader("set-cookie") or "")
        field = re.search(r'name="csrf" value="([^"]+)"', page)
        assert cookie and field, page
        return cookie.group(1), field.group(1)
    finally:
        conn.close()


def post(srv: Any, path: str, fields: dict[str, str], *, cookie: str, headers: dict[str, str] | None = None,
         source: str | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.web_port, timeout=30,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request("POST", path, urllib.parse.urlencode(fields),
                     {"Content-Type": "application/x-www-form-urlencoded", "Cookie": f"ls_csrf={cookie}",
                      **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


# -- units -------------------------------------------------------------------------------------------------
def test_client_address_behind_trusted_proxies() -> None:
    from ldapsync.selfservice.http_limits import ProxyTrust

    t = ProxyTrust(["127.0.0.1", "10.0.0.0/8", "fd00::/8"])
    xff = [b"198.51.100.7, 203.0.113.5"]
    assert t.client("127.0.0.1", xff) == "203.0.113.5"              # right-most, not the client's own claim
    assert t.client("192.0.2.9", xff) == "192.0.2.9"                # untrusted peer: header ignored
    assert t.client("127.0.0.1", [b"203.0.113.5", b"10.9.9.9"]) == "203.0.113.5"   # two headers, one ours
    assert t.client("127.0.0.1", [b"10.1.1.1, 10.2.2.2"]) == "10.1.1.1"            # all ours: the left-most
    assert t.client("127.0.0.1", [b"[2001:db8::1]:443, fd00::5"]) == "2001:db8::1"
    assert t.client("127.0.0.1", [b"203.0.113.5:8080"]) == "203.0.113.5"
    assert t.client("::ffff:127.0.0.1", xff) == "203.0.113.5"
    assert t.client("127.0.0.1", [b"unknown"]) == "127.0.0.1"         # garbage: never an invented client
    assert t.client("127.0.0.1", None) == "127.0.0.1"
    assert ProxyTrust([]).client("127.0.0.1", xff) == "127.0.0.1"   # default: no proxy is trusted


def test_bad_selfservice_limits_are_config_errors(tmp_path: Any) -> None:
    from ldapsync.config import ConfigError, load_config

    cfg = tmp_path / "ldapsync.toml"
    for body, message in (('trusted_proxies = ["10.0.0.0/8", "proxy.example.com"]', "'proxy.example.com' is not an IP"),
                          ('request_timeout = "0"', "request_timeout"),
                          ("max_connections_per_address = 0", "at least 1")):
        cfg.write_text(f"[selfservice]\n{body}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(cfg)
    cfg.write_text('[selfservice]\ntrusted_proxies = ["127.0.0.1", "10.0.0.0/8"]\nidle_timeout = "2m"\n')
    c = load_config(cfg).selfservice
    assert c.trusted_proxies == ("127.0.0.1", "10.0.0.0/8") and c.idle_timeout == 120


# -- /forgot: no link for inactive users -----------------------------------------------------------------
def test_forgot_mails_nothing_to_an_inactive_uninvited_user(srv: Any, sink: Any) -> None:
    """Having no password is how an inactive user looks: asking /forgot for one must not hand out
    an activation link (which would activate an account the admin never invited)."""
    inactive = unique("dormant")
    inactive_dn = add_user(srv, inactive, alt=f"{inactive}@home.example")
    active = unique("awake")
    add_user(srv, active, alt=f"{active}@home.example", password=GOOD)
    invited = unique("invited")
    invited_dn = add_user(srv, invited, alt=f"{invited}@home.example")
    assert srv.cli("user", "invite", invited_dn).returncode == 0
    wait_mail(sink, f"{invited}@home.example")

    c = Client(srv.web_url)
    token = c.csrf("/forgot")
    answers = {}
    for who in (inactive, unique("ghost"), invited, active):     # the inactive user's request goes first
        status, _, page = c.request("/forgot", {"username": who, "csrf": token})
        answers[who] = (status, page)
    assert len(set(answers.values())) == 1, "the page must not tell the cases apart"
    assert answers[active][0] == 200 and "If an account matches" in answers[active][1]
    # Links are mailed in the order they were asked for: once the active user's has arrived, an
    # inactive user's link would have been sent before it.
    reset = wait_mail(sink, f"{active}@home.example")
    assert reset.message["Subject"] == "Reset your password"
    again = wait_mail(sink, f"{invited}@home.example", 2)          # a pending invitation: sent again
    assert again.message["Subject"] == "Activate your account"
    assert mails_to(sink, f"{inactive}@home.example") == []
    assert whoami(srv, inactive_dn, GOOD).returncode == 49
    # The re-sent invitation still activates the invited user.
    token2 = link_in(again).split("token=")[1]
    status, _, page = c.request("/activate", {"token": token2, "new": GOOD, "confirm": GOOD, "csrf": token})
    assert status == 200 and "Your account is active" in page
    assert whoami(srv, invited_dn, GOOD).returncode == 0


# -- bodies limited while they stream ----------------------------------------------------------------------
def test_chunked_200mb_post_is_refused_early_with_bounded_memory(web: Any) -> None:
    srv = web
    pid = srv.proc.pid
    Client(srv.web_url).request("/signin")                   # warm up: the first page's imports
    before = rss_kib(pid)
    sock = connect(srv)
    sock.sendall(b"POST /signin HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                 b"Content-Type: application/x-www-form-urlencoded\r\n\r\n")
    chunk = b"%x\r\n" % MiB + b"a" * MiB + b"\r\n"
    sent = [0]
    stop = threading.Event()

    def upload() -> None:
        try:
            while sent[0] < 200 * MiB and not stop.is_set():
                sock.sendall(chunk)
                sent[0] += MiB
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass                                            # the server closed: expected

    t = threading.Thread(target=upload, daemon=True)
    t.start()
    try:
        # Another client is served while the upload is going on.
        other = Client(srv.web_url)
        status, _, page = other.request("/signin")
        assert status == 200 and "Sign in" in page
        status = read_status(sock)
        sent_then = sent[0]
    finally:
        stop.set()
        t.join(60)
        sock.close()
    assert status == 413
    assert sent_then < 200 * MiB, "the whole body was read before the answer"
    grown = rss_kib(pid) - before
    assert grown < 64 * 1024, f"the server's RSS grew by {grown} KiB"
    # A declared Content-Length over the limit is refused before any body byte is sent.
    with connect(srv) as s2:
        s2.sendall(b"POST /forgot HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 209715200\r\n\r\n")
        assert read_status(s2) == 413
    # The pages still work.
    assert Client(srv.web_url).request("/signin")[0] == 200


# -- slowloris -------------------------------------------------------------------------------------------------
def test_slow_and_silent_connections_are_closed(web: Any) -> None:
    """request_timeout = 2s, idle_timeout = 4s: request lines and headers trickled a byte at a
    time, a form trickled, and connections that send nothing are all closed; meanwhile the pages
    answer other clients."""
    srv = web
    trickle = [connect(srv) for _ in range(40)]
    for s in trickle:
        s.sendall(b"POST /signin HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    slow_body = [connect(srv) for _ in range(10)]
    for s in slow_body:
        s.sendall(b"POST /signin HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n")
    silent = [connect(srv) for _ in range(10)]
    everyone = trickle + slow_body + silent
    open_ = set(range(len(everyone)))
    deadline = time.monotonic() + 60
    while open_ and time.monotonic() < deadline:
        for i in list(open_):
            s = everyone[i]
            if closed_by_server(s):
                open_.discard(i)
                continue
            try:
                if s in trickle:
                    s.sendall(b"X")                       # one more byte of a header line, forever
                elif s in slow_body:
                    s.sendall(b"a")
            except OSError:
                open_.discard(i)
        assert Client(srv.web_url).request("/signin")[0] == 200
        time.sleep(0.5)
    for s in everyone:
        s.close()
    assert not open_, f"{len(open_)} of {len(everyone)} slow connections are still open after 60 s"


def test_connections_per_address_are_capped(make_server: Any) -> None:
    srv = make_server("sqlite", """
[selfservice]
max_connections_per_address = 5
""")
    # the pages listen once the server is up; the first raw connect must not race their start (CI: refused)
    wait_for("the pages listening", lambda: Client(srv.web_url).request("/signin")[0] == 200, 30)
    held = [connect(srv) for _ in range(5)]
    try:
        extra = connect(srv)
        extra.sendall(b"GET /signin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        extra.settimeout(30)
        try:
            got = extra.recv(100)
        except ConnectionResetError:
            got = b""
        assert got == b"", f"a 6th connection from one address was served: {got!r}"
        extra.close()
        # Another address is not affected; and once one of the five goes, the address may connect again.
        with connect(srv, source="127.0.0.2") as s:
            s.sendall(b"GET /signin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_status(s) == 200
        held.pop().close()
        wait_for("a free connection slot", lambda: Client(srv.web_url).request("/signin")[0] == 200, 30)
    finally:
        for s in held:
            s.close()


# -- X-Forwarded-For from trusted proxies only -----------------------------------------------------------------------
def test_forwarded_for_is_honoured_only_from_trusted_proxies(make_server: Any) -> None:
    """The proxy is 127.0.0.1; 127.0.0.2 plays a client that reaches the pages directly."""
    srv = make_server("sqlite", """
[selfservice]
trusted_proxies = ["127.0.0.1", "10.0.0.0/8"]
rate_limit_address = 3
rate_limit_user = 100
""")

    def forgot(xff: str | None, source: str | None = None) -> int:
        cookie, field = csrf_pair(srv, source=source)
        headers = {"X-Forwarded-For": xff} if xff is not None else {}
        return post(srv, "/forgot", {"username": unique("n"), "csrf": field}, cookie=cookie, headers=headers,
                    source=source)[0]

    # Behind the proxy: one budget per real client.
    assert [forgot("203.0.113.5") for _ in range(4)] == [200, 200, 200, 429]
    assert forgot("203.0.113.6") == 200
    # The client's own (spoofed) X-Forwarded-For is to the left of what the proxy appended; another
    # proxy of ours (10.x) in between is skipped.
    assert forgot("198.51.100.7, 203.0.113.5") == 429
    assert forgot("198.51.100.8, 203.0.113.5, 10.1.2.3") == 429
    assert forgot("203.0.113.6, 10.1.2.3") == 200
    # From an untrusted peer the header is ignored: every request counts against 127.0.0.2.
    codes = [forgot(f"192.0.2.{i}", source="127.0.0.2") for i in range(4)]
    assert codes == [200, 200, 200, 429], codes
    log = srv.log.read_text()
    assert "203.0.113.5" in log and "192.0.2.1 " not in log


# -- sessions end with a sign-out or a new password ----------------------------------------------------------------
def _signed_in(srv: Any, uid: str, password: str) -> Client:
    c = Client(srv.web_url)
    status, headers, _ = c.request("/signin", {"username": uid, "password": password, "csrf": c.csrf("/signin")})
    assert status == 303 and headers["location"] == "/account", status
    return c


def _account_status(c: Client) -> int:
    return c.request("/account")[0]


def test_sign_out_and_password_change_end_the_other_sessions(srv: Any) -> None:
    uid = unique("sess")
    dn = add_user(srv, uid, password=GOOD)
    laptop, phone = _signed_in(srv, uid, GOOD), _signed_in(srv, uid, GOOD)
    stolen = [ck.value for ck in phone.jar if ck.name == "ls_session"][0]
    assert _account_status(laptop) == 200 and _account_status(phone) == 200
    # Signing out on the phone ends the laptop's session too, and the phone's cookie, replayed, is dead.
    assert phone.request("/signout", {"csrf": phone.csrf("/account")})[0] == 303
    assert _account_status(laptop) == 303
    replay = Client(srv.web_url)
    assert replay.request("/account", headers={"Cookie": f"ls_session={stolen}"})[0] == 303
    # A password change on the laptop ends the phone's session; the laptop stays signed in.
    laptop, phone = _signed_in(srv, uid, GOOD), _signed_in(srv, uid, GOOD)
    new = "Bright-River-2031"
    status, headers, _ = laptop.request("/account", {"current": GOOD, "new": new, "confirm": new,
                                                     "csrf": laptop.csrf("/account")})
    assert status == 303 and headers["location"] == "/account?changed=1"
    assert _account_status(laptop) == 200
    assert _account_status(phone) == 303
    # A password set another way (LDAP) ends the page sessions as well.
    phone = _signed_in(srv, uid, new)
    srv.run("ldappasswd", "-s", GOOD + "-9", dn, check=True)
    assert _account_status(phone) == 303


def test_wrong_current_passwords_on_the_account_page_lock_the_account(srv: Any) -> None:
    """[policy] lockout_failures = 3: three wrong current passwords on /account lock the account
    for LDAP binds too, exactly as three wrong binds would."""
    uid = unique("guess")
    dn = add_user(srv, uid, password=GOOD)
    c = _signed_in(srv, uid, GOOD)
    for _ in range(3):
        status, _, page = c.request("/account", {"current": "Wrong-Guess-11", "new": "Next-Value-2031",
                                                 "confirm": "Next-Value-2031", "csrf": c.csrf("/account")})
        assert status == 422 and ("not correct" in page or "locked" in page)
    assert whoami(srv, dn, GOOD).returncode == 49                   # locked
    status, _, page = c.request("/account", {"current": GOOD, "new": "Next-Value-2031",
                                             "confirm": "Next-Value-2031", "csrf": c.csrf("/account")})
    assert status == 422 and "locked" in page
    srv.advance_clock(11 * 60)
    assert whoami(srv, dn, GOOD).returncode == 0
