"""Fuzzing a running server over raw sockets: it keeps serving everyone and loses nothing.

Random bytes and structurally mutated valid PDUs (built with ldaptor's
encoders, then flipped, truncated, extended, given corrupt or huge lengths,
nested deeply, or made bigger than ``[ldap] max_pdu_size``) are thrown at a
really listening server (SQLite and PostgreSQL), each burst bounded in
examples and seconds.  After every example the process is alive, an
already-open client still gets answers and the log has no new traceback; a
failure names the input that caused it and the few sent before it.  After each
burst: a fresh client binds and searches and the entries written before are
unchanged.

Fuzz clients never bind with a real password, so no mutated write can succeed.
"""

from __future__ import annotations

import collections
import os
import random
import socket
import time

import pytest
from helpers import ADMIN_DN, GROUPS, PEOPLE, SUFFIX, unique, wait_for
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from ldap3 import BASE, NONE, SUBTREE, Connection, Server
from ldaptor import ldapfilter
from ldaptor.protocols import pureber, pureldap

pytestmark = pytest.mark.e2e

MAX_PDU = 4096
SERVER_CONFIG = f"""
[ldap]
max_pdu_size = {MAX_PDU}
"""
BURST_SECONDS = 8.0           # per burst; 2 bursts per backend (≤ 32 s of fuzzing in all)
MAX_EXAMPLES = 1000
NOTICE_OID = b"1.3.6.1.4.1.1466.20036"

# No shrinking: once the server is broken every input "fails", so a shrunk example would name the
# wrong input; the Watch below reports the first one that broke it.
FUZZ_SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=False,
                         suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])

# -- valid PDUs (ldaptor's encoders) --------------------------------------------------------

FILTERS = ["(objectClass=*)", "(uid=alice)", "(&(cn=a*b*c)(!(sn=x)))", "(|(mail=*@example.com)(uid>=m)(uid<=c))",
           "(cn~=bob)", "(member:2.5.13.1:=uid=a,ou=people,dc=example,dc=com)", "(:2.5.13.2:=x)",
           "(cn:dn:=people)"]


def _attr(name: str, *values: str) -> tuple:
    return (pureldap.LDAPAttributeDescription(name), pureber.BERSet([pureldap.LDAPAttributeValue(v) for v in values]))


def valid_pdus(msgid: int) -> list[bytes]:
    ops = [
        pureldap.LDAPBindRequest(dn=f"uid=x,{PEOPLE}", auth="wrong-password"),
        pureldap.LDAPBindRequest(dn="", auth=""),
        pureldap.LDAPBindRequest(dn="", auth=("PLAIN", b"\0u\0p"), sasl=True),
        *(pureldap.LDAPSearchRequest(baseObject=SUFFIX, scope=2, derefAliases=0, sizeLimit=10, timeLimit=5,
                                     typesOnly=False, filter=f, attributes=["cn", "+", "*"])
          for f in [*map(ldapfilter.parseFilter, FILTERS), pureldap.LDAPFilter_and([]), pureldap.LDAPFilter_or([])]),
        pureldap.LDAPSearchRequest(baseObject="", scope=0, filter=ldapfilter.parseFilter("(objectClass=*)"), attributes=[]),
        pureldap.LDAPAddRequest(entry=f"uid=fz,{PEOPLE}", attributes=[_attr("objectClass", "inetOrgPerson"),
                                                                      _attr("uid", "fz"), _attr("cn", "F"), _attr("sn", "Z")]),
        pureldap.LDAPModifyRequest(object=f"uid=fz,{PEOPLE}", modification=[
            pureber.BERSequence([pureber.BEREnumerated(2), pureber.BERSequence(list(_attr("sn", "Y")))])]),
        pureldap.LDAPDelRequest(entry=f"uid=fz,{PEOPLE}"),
        pureldap.LDAPModifyDNRequest(entry=f"uid=fz,{PEOPLE}", newrdn="uid=fy", deleteoldrdn=True, newSuperior=GROUPS),
        pureldap.LDAPCompareRequest(entry=f"uid=fz,{PEOPLE}", ava=pureldap.LDAPAttributeValueAssertion(
            pureber.BEROctetString("sn"), pureber.BEROctetString("Z"))),
        pureldap.LDAPAbandonRequest(id=1),
        pureldap.LDAPExtendedRequest(requestName="1.3.6.1.4.1.4203.1.11.3"),
        pureldap.LDAPPasswordModifyRequest(userIdentity=f"uid=fz,{PEOPLE}", newPasswd="x"),
        pureldap.LDAPExtendedRequest(requestName="1.2.3.4", requestValue=b"\x30\x00"),
    ]
    out = [pureldap.LDAPMessage(op, id=msgid).toWire() for op in ops]
    out.append(pureldap.LDAPMessage(ops[3], id=msgid, controls=[("1.2.840.113556.1.4.319", True, b"\x30\x05\x02\x01\x02\x04\x00"),
                                                                ("1.2.3.4.5", False, None)]).toWire())
    return out


VALID = valid_pdus(7)


def tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(b))) + b + content


def nested_filter(depth: int, kind: int) -> bytes:
    f = tlv(0x87, b"objectClass")
    for _ in range(depth):
        f = tlv((0xA0, 0xA1, 0xA2)[kind % 3], f)
    return tlv(0x30, b"\x02\x01\x05" + tlv(0x63, tlv(0x04, b"") + b"\x0a\x01\x02\x0a\x01\x00\x02\x01\x00\x02\x01\x00\x01\x01\x00"
                                         + f + b"\x30\x00"))


def header_positions(pdu: bytes) -> list[int]:
    """Offsets of every length octet in a DER-ish PDU (walks constructed elements)."""
    out: list[int] = []

    def walk(s: int, e: int) -> None:
        while s + 2 <= e:
            tag, b = pdu[s], pdu[s + 1]
            out.append(s + 1)
            hl = 2 + (b & 0x7F if b & 0x80 else 0)
            ln = int.from_bytes(pdu[s + 2:s + hl], "big") if b & 0x80 else b
            if tag & 0x20:
                walk(s + hl, min(e, s + hl + ln))
            s += hl + ln

    walk(0, len(pdu))
    return out


@st.composite
def mutated_pdu(draw: st.DrawFn) -> bytes:
    pdu = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.integers(0, 8))
        if kind == 0 and pdu:                      # flip bits
            i = draw(st.integers(0, len(pdu) - 1))
            pdu[i] ^= draw(st.integers(1, 255))
        elif kind == 1 and len(pdu) > 1:           # truncate
            del pdu[draw(st.integers(1, len(pdu) - 1)):]
        elif kind == 2:                            # extend
            pdu += draw(st.binary(min_size=1, max_size=64))
        elif kind == 3:                            # corrupt a length
            pos = draw(st.sampled_from(header_positions(bytes(pdu)) or [1]))
            if pos < len(pdu):
                pdu[pos] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0x81, 0x84, 0x85, 0xFF, draw(st.integers(0, 255))]))
        elif kind == 4:                            # huge length on the envelope or inside
            pos = draw(st.sampled_from(header_positions(bytes(pdu)) or [1]))
            pdu[pos:pos + 1] = b"\x84" + draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x01\x00\x00"]))
        elif kind == 5:                            # deep nesting
            pdu = bytearray(nested_filter(draw(st.integers(50, 1500)), draw(st.integers(0, 2))))
        elif kind == 6:                            # oversized but well-formed
            pad = draw(st.integers(MAX_PDU, 3 * MAX_PDU))
            pdu = bytearray(tlv(0x30, b"\x02\x01\x09" + tlv(0x4A, b"x" * pad)))
        elif kind == 7:                            # two PDUs in one write, msgid 0, splice
            pdu += draw(st.sampled_from(VALID))
            if draw(st.booleans()):
                pdu[2:5] = b"\x02\x01\x00"
        elif kind == 8 and len(pdu) > 4:           # delete a slice in the middle
            i = draw(st.integers(2, len(pdu) - 2))
            del pdu[i:i + draw(st.integers(1, 8))]
    return bytes(pdu)


# -- plumbing ------------------------------------------------------------------------------

def throw(port: int, data: bytes, *, wait: float = 0.02) -> None:
    """Send ``data`` on a new connection, read a little, close."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        try:
            s.sendall(data)
            s.settimeout(wait)
            try:
                while s.recv(65536):
                    pass
            except (TimeoutError, socket.timeout):
                pass
        except OSError:
            pass  # the server may close while we write: that is fine


def ldap3_conn(server, user: str | None = ADMIN_DN, password: str | None = None) -> Connection:
    c = Connection(Server("127.0.0.1", port=server.port, get_info=NONE), user=user,
                   password=password if password is not None else server.admin_password,
                   raise_exceptions=False, receive_timeout=10, auto_bind=True)
    return c


def snapshot(c: Connection, base: str) -> dict[str, dict[str, list[str]]]:
    assert c.search(base, "(objectClass=*)", search_scope=SUBTREE, attributes=["*", "entryUUID", "modifyTimestamp"]), c.result
    return {e.entry_dn: {k: sorted(map(str, v)) for k, v in e.entry_attributes_as_dict.items()} for e in c.entries}


def log_tracebacks(server) -> list[str]:
    text = server.log.read_text(errors="replace")
    return [line for line in text.splitlines() if "Traceback" in line or "Unhandled" in line]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture(scope="module")
def world(server):
    """Entries written before the fuzzing, a long-lived client, and their snapshot."""
    admin = ldap3_conn(server)
    ou = f"ou={unique('fz')},{PEOPLE}"
    assert admin.add(ou, ["organizationalUnit"], {"ou": ou.split(",")[0][3:]}), admin.result
    for i in range(5):
        uid = unique("f")
        assert admin.add(f"uid={uid},{ou}", ["inetOrgPerson"], {
            "uid": uid, "cn": f"Fuzz {i}", "sn": "Fuzz", "mail": f"{uid}@example.com",
            "description": ["one", "two", f"ünïcödé {i}"], "userPassword": "Fuzz-Pass-1"}), admin.result
    before = snapshot(admin, ou)
    keeper = ldap3_conn(server)   # the well-behaved client that stays open through every burst
    yield {"ou": ou, "before": before, "keeper": keeper, "admin": admin}
    keeper.unbind()
    admin.unbind()


def check_healthy(server, world) -> None:
    assert server.proc is not None and server.proc.poll() is None, "server process died"
    keeper: Connection = world["keeper"]
    assert keeper.search(SUFFIX, "(objectClass=*)", search_scope=BASE), keeper.result   # (a)
    fresh = ldap3_conn(server)                                                          # (b)
    try:
        assert fresh.bound
        assert fresh.search(world["ou"], "(uid=*)", attributes=["uid"]) and len(fresh.entries) == 5, fresh.result
        assert snapshot(fresh, world["ou"]) == world["before"]                          # (c)
    finally:
        fresh.unbind()
    assert log_tracebacks(server) == []                                                 # (e)


class Watch:
    """Checks the server after every fuzz example and keeps the input that first broke it.

    A traceback is logged as the server handles the input, which may be a moment after the
    client closed: the report names the last few inputs too, the failing one last."""

    def __init__(self, server, world, keep: int = 5) -> None:
        self.server, self.keeper = server, world["keeper"]
        self.offset = server.log.stat().st_size
        self.recent: collections.deque[bytes] = collections.deque(maxlen=keep)
        self.failure: str | None = None

    def problem(self) -> str | None:
        if self.server.proc is None or self.server.proc.poll() is not None:
            return "the server process died"
        if not self.keeper.search(SUFFIX, "(objectClass=*)", search_scope=BASE):
            return f"the open client got no answer: {self.keeper.result}"
        with open(self.server.log, "rb") as f:
            f.seek(self.offset)
            new = f.read()
        self.offset += len(new)
        bad = [line for line in new.decode("utf-8", "replace").splitlines() if "Traceback" in line or "Unhandled" in line]
        return f"the log got a traceback: {bad[0]}" if bad else None

    def after(self, data: bytes) -> None:
        """Call after sending ``data``; raises (naming the inputs) when the server is unwell."""
        if self.failure is None:
            self.recent.append(data)
            problem = self.problem()
            if problem is not None:
                before = "".join(f"\n  {d.hex()}" for d in list(self.recent)[:-1]) or " none"
                self.failure = f"{problem} after input {data.hex()} (len {len(data)}); the inputs before it:{before}"
                print(self.failure)
        if self.failure is not None:
            raise AssertionError(self.failure)

    def raise_if_failed(self) -> None:
        """Hypothesis replays the failing example at the end (maybe past the budget): fail again."""
        if self.failure is not None:
            raise AssertionError(self.failure)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.count = 0

    def spend(self) -> bool:
        if time.monotonic() >= self.end:
            return False
        self.count += 1
        return True


# -- fuzz bursts ---------------------------------------------------------------------------

def test_fuzz_random_bytes(server, world) -> None:
    budget = Budget(BURST_SECONDS)
    watch = Watch(server, world)
    started = time.monotonic()

    @FUZZ_SETTINGS
    @given(st.one_of(st.binary(min_size=1, max_size=512),
                     st.binary(min_size=1, max_size=512).map(lambda b: b"\x30" + b),
                     st.binary(min_size=1, max_size=64).map(lambda b: b"\x30\x84" + b)))
    def run(data: bytes) -> None:
        if budget.spend():
            throw(server.port, data)
            watch.after(data)
        watch.raise_if_failed()

    run()
    print(f"random bytes: {budget.count} examples sent in {time.monotonic() - started:.1f}s")
    check_healthy(server, world)


def test_fuzz_mutated_pdus(server, world) -> None:
    budget = Budget(BURST_SECONDS)
    watch = Watch(server, world)
    started = time.monotonic()

    @FUZZ_SETTINGS
    @given(st.lists(mutated_pdu(), min_size=1, max_size=3))
    def run(pdus: list[bytes]) -> None:
        if budget.spend():
            throw(server.port, b"".join(pdus))
            watch.after(b"".join(pdus))
        watch.raise_if_failed()

    run()
    print(f"mutated PDUs: {budget.count} examples sent in {time.monotonic() - started:.1f}s")
    check_healthy(server, world)


def test_valid_pdus_still_work_on_one_connection(server, world) -> None:
    """The unmutated corpus is handled (answers, not disconnects), then the connection still answers."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        for i, pdu in enumerate(VALID):
            s.sendall(pdu)
        s.sendall(pureldap.LDAPMessage(pureldap.LDAPExtendedRequest(requestName="1.3.6.1.4.1.4203.1.11.3"), id=99).toWire())
        data = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and b"\x02\x01\x63" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        assert NOTICE_OID not in data
        assert b"\x02\x01\x63" in data  # the Who am I? with msgid 99 was answered
    check_healthy(server, world)


# -- explicit cases ------------------------------------------------------------------------

def read_until_eof(s: socket.socket, timeout: float = 5) -> bytes:
    s.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"connection not closed by the server; got {data!r}")


def new_log(server, offset: int) -> str:
    with open(server.log, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


def test_garbage_stream_closes_that_connection_only(server, world) -> None:
    other = ldap3_conn(server)
    offset = server.log.stat().st_size
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        port = s.getsockname()[1]
        s.sendall(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n" + bytes(random.Random(1).randbytes(2000)))
        data = read_until_eof(s)
    assert NOTICE_OID in data and b"\x0a\x01\x02" in data      # Notice of Disconnection, protocolError
    assert b"Traceback" not in data
    assert other.search(SUFFIX, "(objectClass=*)", search_scope=BASE), other.result
    other.unbind()

    def lines_for(p: int) -> list[str]:
        return [line for line in new_log(server, offset).splitlines() if f":{p}" in line]
    wait_for("the log line of the closed connection", lambda: lines_for(port), 30)
    # one line, not one per garbage chunk: checked once a later closed connection was logged too
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        later = s.getsockname()[1]
        s.sendall(b"\x00\x00")
        read_until_eof(s)
    wait_for("the log line of a later closed connection", lambda: lines_for(later), 30)
    assert len(lines_for(port)) == 1, lines_for(port)
    check_healthy(server, world)


@pytest.mark.parametrize("how", ["header-only", "whole-pdu", "huge-length"])
def test_pdu_over_the_limit_closes_the_connection(server, world, how: str) -> None:
    other = ldap3_conn(server)
    if how == "header-only":
        data = b"\x30\x82" + (MAX_PDU + 1).to_bytes(2, "big") + b"\x02\x01\x01"
    elif how == "whole-pdu":
        data = pureldap.LDAPMessage(pureldap.LDAPAddRequest(entry=f"uid=big,{PEOPLE}", attributes=[
            _attr("objectClass", "inetOrgPerson"), _attr("description", "x" * (MAX_PDU * 2))]), id=3).toWire()
    else:
        data = b"\x30\x84\xff\xff\xff\xf0\x02\x01\x01"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        got = read_until_eof(s)
    assert NOTICE_OID in got and b"\x0a\x01\x02" in got, got[:200]   # README: a Notice of Disconnection (protocolError)
    assert b"Traceback" not in got
    assert other.search(SUFFIX, "(objectClass=*)", search_scope=BASE), other.result
    other.unbind()
    check_healthy(server, world)


def test_slow_partial_pdus_do_not_leak(server, world) -> None:
    pid = server.proc.pid
    pdu = VALID[3]
    time.sleep(0.3)
    fds_before = fd_count(pid)
    socks = []
    for i in range(20):                  # many half-sent PDUs, open at once
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        s.sendall(pdu[: 1 + i % (len(pdu) - 1)])
        socks.append(s)
    for s in socks[:3]:                  # a few trickle bytes, byte by byte
        # The trickled bytes do not continue the PDU, so the server may rightly
        # close the connection part-way: that is fine, it must only not leak.
        try:
            for b in pdu[s.getsockname()[1] % 5 + 5:][:10]:
                s.sendall(bytes((b,)))
                time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert world["keeper"].search(SUFFIX, "(objectClass=*)", search_scope=BASE)
    for s in socks:
        s.close()
    deadline = time.monotonic() + 10
    while fd_count(pid) > fds_before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fd_count(pid) <= fds_before + 2, (fds_before, fd_count(pid))
    check_healthy(server, world)
