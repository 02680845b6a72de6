"""The README's promise to a newcomer, run as written in a fresh clone (issue 18).

A clone of this checkout's HEAD gets the README's run command exactly as the README prints it
(a new virtualenv, ``pip install -e .``, ``twistd -n ldapsync`` on the embedded defaults); then the
"Using it" examples run against it with bash, then the "See it work" demo command.  A README edit
that breaks a command, a dependency missing from pyproject.toml (the clone's venv has only what
``pip install -e .`` installs) or a default that moved fails here.

The examples' one interactive command (``ldappasswd -S`` prompts on the terminal) runs with ``-s``
and the new password on the command line instead; everything else runs verbatim.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT  # type: ignore[import-not-found]

pytestmark = pytest.mark.e2e

README = ROOT / "README.md"
INSTALL_TIMEOUT = 900.0            # a cold pip cache downloads every dependency


def sh_blocks(section: str) -> list[str]:
    """The ```sh blocks of the README section whose heading starts with ``section``."""
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"^#+ {re.escape(section)}.*?$(.*?)(?=^## )", text, re.M | re.S)
    assert m, f"README has no section {section!r}"
    return re.findall(r"^```sh\n(.*?)^```", m.group(1), re.M | re.S)


def one_command(section: str, contains: str) -> str:
    cmds = [b.strip() for b in sh_blocks(section) if contains in b]
    assert len(cmds) == 1 and "\n" not in cmds[0], f"README {section!r}: expected one one-line command with {contains!r}, got {cmds}"
    return cmds[0]


def port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:``port`` (a socket in TIME_WAIT does not count: the server binds
    with SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
    """Send ``sig`` to the README command (bash) and everything it started, and wait until every one
    of them has exited (the server's listeners are closed then)."""
    deadline = time.monotonic() + timeout
    try:
        os.killpg(proc.pid, sig)
        while time.monotonic() < deadline:
            proc.poll()                     # reap it: a zombie still counts as a member of the group
            os.killpg(proc.pid, 0)          # ProcessLookupError once the whole group is gone
            time.sleep(0.2)
    except ProcessLookupError:
        proc.wait(10)
        return
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"the README command did not stop within {timeout:.0f} s of signal {sig}")


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    if not (ROOT / ".git").exists():
        pytest.fail("this test clones the checkout: run it from a git clone of ldapsync")
    dest = tmp_path_factory.mktemp("readme") / "ldapsync"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(dest)], check=True, timeout=120)
    return dest


def clean_env() -> dict[str, str]:
    """The environment a newcomer's shell has: no test venv on PATH, no config or PG overrides."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LDAPSYNC_CONFIG", "VIRTUAL_ENV", "PYTHONPATH") and not k.startswith("LDAPSYNC_TEST")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(ROOT)) and "/.venv/" not in p + "/")
    return env


@pytest.fixture(scope="module")
def running_server(clone: Path) -> Iterator[subprocess.Popen]:
    cmd = one_command("The two commands", "twistd -n ldapsync")
    for port in (10389, 8080):
        assert port_free(port), f"127.0.0.1:{port} is taken: the README command uses it by default; stop what holds it"
    log = open(clone / "run-command.log", "wb")
    proc = subprocess.Popen(["bash", "-c", cmd], cwd=clone, stdout=log, stderr=subprocess.STDOUT,
                            env=clean_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + INSTALL_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the run command ended (rc={proc.returncode}):\n"
                                     + (clone / "run-command.log").read_text(errors="replace")[-3000:])
            if (clone / "var" / "admin-password").exists() and not port_free(10389):
                break
            assert time.monotonic() < deadline, "the run command did not start the server in time"
            time.sleep(0.5)
        yield proc
    finally:
        if proc.poll() is None:
            stop(proc)
        log.close()


def test_run_command_then_the_using_it_examples(clone, running_server):
    block = sh_blocks("Using it")[0]
    assert "ldappasswd" in block and " -S" in block, "the Using-it block changed: update this test's -S substitution"
    script = block.replace(" -S", " -s Other-Horse-8", 1)
    p = subprocess.run(["bash", "-e", "-c", script], cwd=clone, capture_output=True, timeout=120, env=clean_env())
    out = p.stdout.decode()
    assert p.returncode == 0, (p.returncode, out, p.stderr.decode())
    assert "dn:cn=admin,dc=example,dc=com" in out                        # ldapwhoami
    assert "memberOf: cn=staff,ou=groups,dc=example,dc=com" in out        # the search shows the group
    # the password ldappasswd set is alice's now
    pw = subprocess.run(["ldapwhoami", "-x", "-H", "ldap://127.0.0.1:10389", "-D", "uid=alice,ou=people,dc=example,dc=com",
                         "-w", "Other-Horse-8"], capture_output=True, timeout=30)
    assert pw.returncode == 0, pw.stderr
    # the pages answer on the address the README gives
    with socket.create_connection(("127.0.0.1", 8080), timeout=10) as s:
        s.sendall(b"GET /signin HTTP/1.0\r\nHost: 127.0.0.1:8080\r\n\r\n")
        assert s.recv(64).split(b" ", 2)[1] == b"200", "GET /signin on the README's pages address"
    # SIGTERM (what systemctl stop sends) stops it cleanly
    stop(running_server)
    log = (clone / "run-command.log").read_text(errors="replace")
    assert "Server Shut Down." in log and "Traceback" not in log, log[-3000:]


def test_demo_command(clone, running_server):
    if running_server.poll() is None:
        stop(running_server)             # the demo takes the default ports when they are free
    cmd = one_command("See it work", "ldapsync demo")
    proc = subprocess.Popen(["bash", "-c", cmd], cwd=clone, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=clean_env(), start_new_session=True, text=True)
    try:
        got: dict[str, str] = {}
        deadline = time.monotonic() + INSTALL_TIMEOUT
        assert proc.stdout is not None
        while "tenant" not in got:
            line = proc.stdout.readline()
            assert line, f"the demo ended before printing where it runs (rc={proc.poll()}): {got}"
            if ": " in line:
                k, v = line.rstrip("\n").split(": ", 1)
                got[k] = v
            assert time.monotonic() < deadline, f"the demo printed only {got}"
        assert got["ldap"].startswith("ldap://127.0.0.1:")
        who = subprocess.run(["ldapwhoami", "-x", "-H", got["ldap"], "-D", got["admin dn"], "-y", got["admin password file"]],
                             capture_output=True, timeout=30)
        assert who.returncode == 0, who.stderr
    finally:
        stop(proc, signal.SIGINT)          # Ctrl-C stops all of it
