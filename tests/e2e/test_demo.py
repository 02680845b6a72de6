"""`ldapsync demo` from a fresh directory: a user added over LDAP appears in the fake tenant."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
EXPECTED = ["ldap", "admin dn", "admin password file", "pages", "mail", "tenant"]


def _read_lines(proc: subprocess.Popen, timeout: float) -> dict[str, str]:
    """The ``key: value`` lines the demo prints once everything listens."""
    assert proc.stdout is not None
    got: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while "tenant" not in got:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the demo ended before printing where it runs (rc={proc.poll()}): {got}")
        if ": " in line:
            k, v = line.rstrip("\n").split(": ", 1)
            got[k] = v
        if time.monotonic() > deadline:
            raise AssertionError(f"the demo printed only {got} in {timeout:.0f} s")
    return got


def _printed_ldif(proc: subprocess.Popen, timeout: float) -> str:
    """The LDIF the demo's "Try it" text feeds to ldapadd (between ``<<'EOF'`` and ``EOF``)."""
    assert proc.stdout is not None
    ldif: list[str] | None = None
    deadline = time.monotonic() + timeout
    while True:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the demo ended before printing the ldapadd example (rc={proc.poll()})")
        if ldif is not None:
            if line.rstrip("\n") == "EOF":
                return "".join(ldif)
            ldif.append(line)
        elif line.startswith("ldapadd ") and line.rstrip("\n").endswith("<<'EOF'"):
            ldif = []
        if time.monotonic() > deadline:
            raise AssertionError(f"the demo printed no ldapadd example in {timeout:.0f} s")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_demo_binds_a_user_and_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LDAPSYNC_CONFIG"}
    demo_dir = tmp_path / "demo"
    proc = subprocess.Popen([str(BIN / "ldapsync"), "demo", "--dir", str(demo_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    ldap_port = None
    try:
        lines = _read_lines(proc, timeout=240)
        assert list(lines)[:6] == EXPECTED
        ldap_url, pw_file, admin = lines["ldap"], lines["admin password file"], lines["admin dn"]
        ldap_port = int(ldap_url.rsplit(":", 1)[1])
        # alice, as the demo tells its user to add her
        add = subprocess.run(["ldapadd", "-x", "-H", ldap_url, "-D", admin, "-y", pw_file],
                             input=_printed_ldif(proc, timeout=60), capture_output=True, text=True, timeout=60)
        assert add.returncode == 0, add.stderr
        deadline = time.monotonic() + 90
        listed = ""
        while time.monotonic() < deadline:
            r = subprocess.run([str(BIN / "ldapsync"), "demo", "users", "--dir", str(demo_dir)],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            listed = r.stdout
            if any(line.split()[:2] == ["alice@example.com", "true"] for line in listed.splitlines()):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"alice never appeared enabled in the fake tenant:\n{listed}")
        search = subprocess.run(["ldapsearch", "-LLL", "-x", "-H", ldap_url, "-D", admin, "-y", pw_file,
                                 "-b", "ou=people,dc=example,dc=com", "(uid=alice)", "o365SyncState"],
                                capture_output=True, text=True, timeout=60)
        deadline = time.monotonic() + 60
        while "o365SyncState: synced" not in search.stdout and time.monotonic() < deadline:
            time.sleep(0.5)
            search = subprocess.run(search.args, capture_output=True, text=True, timeout=60)
        assert "o365SyncState: synced" in search.stdout, search.stdout + search.stderr
        assert Path(lines["mail"]).is_dir()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, proc.stderr.read() if proc.stderr else ""
    assert ldap_port is not None and not _port_open(ldap_port), "the LDAP server still listens after Ctrl-C"
    leftovers = subprocess.run(["pgrep", "-af", str(demo_dir)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", f"processes left behind: {leftovers.stdout}"


def test_demo_users_without_a_demo_says_so(tmp_path: Path) -> None:
    r = subprocess.run([str(BIN / "ldapsync"), "demo", "users", "--dir", str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1
    assert "no running demo" in r.stderr and "Traceback" not in r.stderr
