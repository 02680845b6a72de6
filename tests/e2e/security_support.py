"""Support for the security tests (test_security_bind.py, test_security_limits.py).

- Raw LDAP over a socket, optionally from another loopback source address
  (127.0.0.2, …: Linux routes all of 127/8 to lo), for what real clients never
  send: pipelined binds, oversized or half-sent PDUs, requests never read.
- The server process's resident memory and CPU time from /proc.
- :func:`run_slapd_ppolicy`: the reference — a private OpenLDAP slapd on
  loopback (``slapd_support.run_slapd``) with the ppolicy overlay (lockout
  after ``max_failure`` wrong passwords) and its default limits
  (``sockbuf_max_incoming`` 256 KiB before a bind, ``conn_max_pending``
  100), to compare ldapsync's behaviour with.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from helpers import ADMIN_DN, PEOPLE, SUFFIX, parse_ldif_output, unique
from perf.loadgen import ber_int, bind_op, frame, octets, tlv
from slapd_support import run_slapd

BIND_RESPONSE = 0x61
SEARCH_DONE = 0x65
EXTENDED_RESPONSE = 0x78
NOTICE_OF_DISCONNECTION = b"1.3.6.1.4.1.1466.20036"


# -- raw LDAP ----------------------------------------------------------------------------------
def connect(port: int, source: str = "127.0.0.1", timeout: float = 60.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    return s


def bind_req(msgid: int, dn: str, password: str) -> bytes:
    return frame(msgid, bind_op(dn, password))


def search_req(msgid: int, base: str, filter_value: str = "", attrs: tuple[str, ...] = (), scope: int = 0) -> bytes:
    """A search; with ``filter_value`` (description=value), else (objectClass=*)."""
    flt = tlv(0xA3, octets("description") + octets(filter_value)) if filter_value else tlv(0x87, b"objectClass")
    body = (octets(base) + ber_int(scope, 0x0A) + ber_int(0, 0x0A) + ber_int(0) + ber_int(0) + b"\x01\x01\x00"
            + flt + tlv(0x30, b"".join(octets(a) for a in attrs)))
    return frame(msgid, tlv(0x63, body))


def _hdr(buf: bytearray, pos: int) -> tuple[int, int] | None:
    if pos + 2 > len(buf):
        return None
    ln = buf[pos + 1]
    if ln < 0x80:
        return pos + 2, ln
    k = ln & 0x7F
    if pos + 2 + k > len(buf):
        return None
    return pos + 2 + k, int.from_bytes(buf[pos + 2:pos + 2 + k], "big")


@dataclass
class Response:
    msgid: int
    tag: int
    code: int | None
    raw: bytes


def parse(buf: bytearray) -> list[Response]:
    """Complete LDAP messages at the start of ``buf`` (removed from it)."""
    out = []
    pos = 0
    while True:
        h = _hdr(buf, pos)
        if h is None or h[0] + h[1] > len(buf):
            break
        start, ln = h
        mid = _hdr(buf, start)
        assert mid is not None
        msgid = int.from_bytes(buf[mid[0]:mid[0] + mid[1]], "big")
        op_pos = mid[0] + mid[1]
        tag = buf[op_pos]
        code = None
        oh = _hdr(buf, op_pos)
        if tag in (BIND_RESPONSE, SEARCH_DONE, EXTENDED_RESPONSE, 0x67, 0x69, 0x6B, 0x6D, 0x6F) and oh and buf[oh[0]] == 0x0A:
            code = buf[oh[0] + 2]
        out.append(Response(msgid, tag, code, bytes(buf[pos:start + ln])))
        pos = start + ln
    del buf[:pos]
    return out


def read_until(sock: socket.socket, want: int, tag: int | None = None, timeout: float = 120.0) -> tuple[list[Response], bool]:
    """Read until ``want`` responses (with ``tag``, if given) came: (responses, closed by the server?)."""
    buf = bytearray()
    got: list[Response] = []
    deadline = time.monotonic() + timeout
    while sum(1 for r in got if tag is None or r.tag == tag) < want:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out: {len(got)} responses, wanted {want}")
        sock.settimeout(left)
        try:
            data = sock.recv(1 << 16)
        except (ConnectionResetError, BrokenPipeError):
            return got + parse(buf), True
        if not data:
            return got + parse(buf), True
        buf += data
        got += parse(buf)
    return got, False


def closed_by_server(sock: socket.socket, timeout: float = 60.0) -> tuple[bool, bytes]:
    """Wait for the server to close: (closed?, bytes received before)."""
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.1))
        try:
            chunk = sock.recv(1 << 16)
        except (ConnectionResetError, BrokenPipeError):
            return True, data
        except socket.timeout:
            return False, data
        if not chunk:
            return True, data
        data += chunk
    return False, data


def send_quietly(sock: socket.socket, data: bytes) -> int:
    """Send what the peer takes; stop (without raising) when it closes or stops reading."""
    sent = 0
    try:
        view = memoryview(data)
        while sent < len(data):
            sent += sock.send(view[sent:sent + (1 << 16)])
    except OSError:
        pass
    return sent


# -- the server process --------------------------------------------------------------------------
def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def wait_idle(pid: int, timeout: float = 120.0) -> None:
    """Wait until the process used no CPU for a second (it finished what it could do)."""
    deadline = time.monotonic() + timeout
    last = cpu_ticks(pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = cpu_ticks(pid)
        if now - last <= 2:
            return
        last = now
    raise AssertionError(f"process {pid} still busy after {timeout}s")


def log_count(log: Path, text: str) -> int:
    return log.read_text(errors="replace").lower().count(text.lower())


# -- the reference: slapd with ppolicy -------------------------------------------------------------
@dataclass
class Slapd:
    port: int
    admin_pw: str
    workdir: Path

    def add(self, ldif: str) -> None:
        p = subprocess.run(["ldapadd", "-x", "-H", f"ldap://127.0.0.1:{self.port}", "-D", ADMIN_DN, "-w", self.admin_pw],
                           input=ldif, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "LDAPCONF": "/dev/null", "LDAPRC": "/dev/null"})
        assert p.returncode == 0, p.stderr

    def values(self, dn: str, attr: str) -> list[str]:
        p = subprocess.run(["ldapsearch", "-x", "-LLL", "-H", f"ldap://127.0.0.1:{self.port}", "-D", ADMIN_DN,
                            "-w", self.admin_pw, "-b", dn, "-s", "base", "(objectClass=*)", attr],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "LDAPCONF": "/dev/null", "LDAPRC": "/dev/null"})
        assert p.returncode == 0, p.stderr
        return parse_ldif_output(p.stdout).get(dn, {}).get(attr, [])

    def add_user(self, password: str) -> str:
        uid = unique("s")
        dn = f"uid={uid},{PEOPLE}"
        self.add(f"dn: {dn}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: Test\nuserPassword: {password}\n")
        return dn


@contextlib.contextmanager
def run_slapd_ppolicy(workdir: Path, *, max_failure: int = 5) -> Iterator[Slapd]:
    with run_slapd(workdir, ppolicy_default=f"cn=default,ou=policies,{SUFFIX}") as proc:
        s = Slapd(proc.port, proc.admin_pw, proc.workdir)
        s.add(f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: example\n\n"
              f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n\n"
              f"dn: ou=policies,{SUFFIX}\nobjectClass: organizationalUnit\nou: policies\n\n"
              f"dn: cn=default,ou=policies,{SUFFIX}\nobjectClass: device\nobjectClass: pwdPolicy\ncn: default\n"
              f"pwdAttribute: userPassword\npwdMaxFailure: {max_failure}\npwdLockout: TRUE\n"
              "pwdLockoutDuration: 600\npwdFailureCountInterval: 600\n")
        yield s
