"""What an unauthenticated client can make the LDAP server hold (issue 15): slapd-like limits.

A real server, raw sockets, the server's resident memory read from /proc/<pid>/status.  Each
resource test also checks that another client keeps being served meanwhile.  The PDU limit before
a bind is compared with OpenLDAP's slapd (``sockbuf_max_incoming`` = 256 KiB by default).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from helpers import ADMIN_DN, PEOPLE, unique, user_ldif, wait_for
from perf.loadgen import frame, modify_op, octets, tlv
from e2e.security_support import (BIND_RESPONSE, NOTICE_OF_DISCONNECTION, SEARCH_DONE, Slapd, bind_req, closed_by_server,
                                  connect, log_count, read_until, rss_kib, run_slapd_ppolicy, search_req, send_quietly,
                                  wait_idle)

from ldapsync.config import Config

pytestmark = pytest.mark.e2e

KIB = 1024
MIB = 1024 * KIB


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    with run_slapd_ppolicy(tmp_path_factory.mktemp("slapd-limits")) as s:
        yield s


def _big_search(msgid: int, size: int) -> bytes:
    return search_req(msgid, PEOPLE, filter_value="x" * size, scope=2)


def _check_pdu_limit(port: int, dn: str, password: str) -> bytes:
    """A 300 KiB request closes an anonymous connection; after a bind it is answered."""
    with connect(port) as s:
        send_quietly(s, _big_search(1, 300 * KIB))
        closed, data = closed_by_server(s)
        assert closed, "the server kept an anonymous connection that sent a 300 KiB request"
    with connect(port) as s:
        s.sendall(bind_req(1, dn, password))
        got, _ = read_until(s, 1, BIND_RESPONSE)
        assert got[0].code == 0
        s.sendall(_big_search(2, 300 * KIB))
        got, closed = read_until(s, 1, SEARCH_DONE)
        assert not closed and got[-1].code == 0
    return data


def test_pdu_limit_before_bind(make_server) -> None:
    srv = make_server("sqlite")
    uid = unique("pdu")
    srv.run("ldapadd", input=user_ldif(uid, password="Pdu-Pass-1"), check=True)
    data = _check_pdu_limit(srv.port, f"uid={uid},{PEOPLE}", "Pdu-Pass-1")
    assert NOTICE_OF_DISCONNECTION in data and b"max_pdu_size_anonymous" in data, data   # says why, and the key


def test_slapd_reference_pdu_limit_before_bind(slapd: Slapd) -> None:
    _check_pdu_limit(slapd.port, slapd.add_user("Pdu-Pass-1"), "Pdu-Pass-1")


def test_anonymous_partial_requests_do_not_grow_memory(make_server) -> None:
    """30 anonymous connections each start a 10 MiB request and send 9 MiB of it: the server closes
    each at its first bytes, so its memory stays where it was; a client binds and searches meanwhile."""
    srv = make_server("sqlite")
    assert srv.proc is not None
    pid = srv.proc.pid
    assert srv.run("ldapsearch", "-LLL", "-b", PEOPLE, "(uid=nobody)").returncode == 0   # warmed up
    before = rss_kib(pid)
    head = b"\x30\x84" + (10 * MIB - 64).to_bytes(4, "big")      # within max_pdu_size (10 MiB)
    body = b"\x02\x01\x01" + b"x" * (9 * MIB)
    socks = [connect(srv.port) for _ in range(30)]
    senders = [threading.Thread(target=send_quietly, args=(s, head + body)) for s in socks]
    try:
        for t in senders:
            t.start()
        p = srv.run("ldapsearch", "-LLL", "-b", PEOPLE, "(uid=nobody)")
        assert p.returncode == 0, p.stderr
        for t in senders:
            t.join(120)
        wait_idle(pid)
        grown = rss_kib(pid) - before
    finally:
        for s in socks:
            s.close()
    assert grown < 48 * KIB, f"server RSS grew by {grown} KiB"


def test_connection_caps(make_server) -> None:
    srv = make_server("sqlite", "[ldap]\nmax_connections = 6\nmax_connections_per_address = 3\n")

    def served(source: str) -> object:
        s = connect(srv.port, source=source, timeout=30)
        s.sendall(search_req(1, ""))
        got, closed = read_until(s, 1, SEARCH_DONE, timeout=30)
        assert not closed and got[-1].code == 0
        return s

    def refused(source: str) -> bool:
        try:
            s = connect(srv.port, source=source, timeout=30)
        except ConnectionResetError:
            return True                               # closed before connect() even returned
        with s:
            send_quietly(s, search_req(1, ""))
            closed, data = closed_by_server(s)
            return closed and not data

    mine = [served("127.0.0.1") for _ in range(3)]
    assert refused("127.0.0.1")                      # the 4th from one address
    theirs = [served("127.0.0.2") for _ in range(3)]
    assert refused("127.0.0.3")                      # the 7th in all
    for _ in range(5):
        assert refused("127.0.0.1")
    assert log_count(srv.log, "refusing LDAP connections from 127.0.0.1") == 1   # once a minute per address
    assert log_count(srv.log, "refusing LDAP connections from 127.0.0.3") == 1
    mine.pop().close()
    s = None
    for _ in range(100):                              # the server sees the close a moment later
        try:
            s = served("127.0.0.1")
            break
        except AssertionError:
            continue
    assert s is not None
    for c in [*mine, *theirs, s]:
        c.close()


def test_idle_timeout_is_on_by_default() -> None:
    assert Config().ldap.idle_timeout == 900.0
    assert Config().ldap.max_pdu_size_anonymous == 256 * KIB


def test_client_that_does_not_read_is_paused(make_server) -> None:
    """A client pipelines 3000 cn=Subschema searches (a big answer each) and reads nothing: the
    server stops taking requests when its answers pile up (backpressure), so its memory stays
    bounded; another client is served meanwhile; once the client reads, every answer comes."""
    srv = make_server("sqlite")
    assert srv.proc is not None
    pid = srv.proc.pid
    assert srv.run("ldapsearch", "-LLL", "-b", "cn=Subschema", "-s", "base", "(objectClass=*)", "+").returncode == 0
    before = rss_kib(pid)
    n = 3000
    requests = b"".join(search_req(i + 1, "cn=Subschema", attrs=("*", "+")) for i in range(n))
    with connect(srv.port) as s:
        sender = threading.Thread(target=send_quietly, args=(s, requests))
        sender.start()
        wait_idle(pid)
        grown = rss_kib(pid) - before
        p = srv.run("ldapwhoami")
        assert p.returncode == 0, p.stderr
        got, closed = read_until(s, n, SEARCH_DONE, timeout=300)
        sender.join(60)
    assert not closed and [r.code for r in got if r.tag == SEARCH_DONE] == [0] * n
    assert grown < 64 * KIB, f"server RSS grew by {grown} KiB while the client did not read"


def test_client_that_never_reads_is_dropped_after_idle_timeout(make_server) -> None:
    """Its answers would otherwise stay in the server's memory for as long as it keeps the socket."""
    srv = make_server("sqlite", '[ldap]\nidle_timeout = "2s"\n')
    n = 3000
    with connect(srv.port) as s:
        send_quietly(s, b"".join(search_req(i + 1, "cn=Subschema", attrs=("*", "+")) for i in range(n)))
        wait_for("the server to drop the connection",
                 lambda: log_count(srv.log, "the client has not read its answers") == 1, timeout=120)
        got, closed = read_until(s, n, SEARCH_DONE, timeout=120)
    assert closed and len(got) < n
    assert srv.run("ldapwhoami").returncode == 0


def test_pending_operations_per_connection_are_capped(make_server) -> None:
    """With max_pending = 1 a quick Who am I? pipelined behind a modify waits for it; by default
    (1000) operations on one connection run side by side and the quick one is answered first."""
    whoami = frame(3, tlv(0x77, octets("1.3.6.1.4.1.4203.1.11.3", 0x80)))
    for cap, first in (("1", 0x67), ("1000", 0x78)):          # ModifyResponse / ExtendedResponse
        srv = make_server("sqlite", f"[ldap]\nmax_pending = {cap}\n")
        with connect(srv.port) as s:
            s.sendall(bind_req(1, ADMIN_DN, srv.admin_password))
            got, _ = read_until(s, 1, BIND_RESPONSE)
            assert got[0].code == 0
            s.sendall(frame(2, modify_op(PEOPLE, "description", "pending " + unique())) + whoami)
            got, _ = read_until(s, 2)
        assert [r.tag for r in got] == [first, 0x67 + 0x78 - first], (cap, got)
        srv.stop()
