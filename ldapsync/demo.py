"""``ldapsync demo``: the server, a fake Microsoft 365 tenant and an SMTP sink, wired together.

The one production module allowed to use :mod:`ldapsync.testing` (the fake tenant and the SMTP
sink are test doubles); nothing else imports this module but the CLI. Everything runs as child
processes of the demo, all on 127.0.0.1, with their state in one directory::

    DIR/ldapsync.toml        the server's config ([office365] points at the fake tenant)
    DIR/var/                 database, admin password, secret key (as in production)
    DIR/tenant/              the fake tenant's state; tenant.json says where it listens
    DIR/mail/                every mail the server sends, as NNNNNN.eml
    DIR/demo.json            what `ldapsync demo users --dir DIR` needs to find the tenant

The tenant verifies the domain of the directory's suffix (example.com for dc=example,dc=com), so
users with `mail: …@example.com` can be bound. Ctrl-C (or SIGTERM) stops all of it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ldapsync.testing.client import AdminClient, FakeTenantProcess
from ldapsync.testing.ports import NotListening, free_port, wait_port

SUFFIX = "dc=example,dc=com"
DOMAIN = "example.com"


class DemoError(Exception):
    """The demo could not start; the message says which part and why."""


def _port(preferred: int) -> int:
    """``preferred`` when it is free on 127.0.0.1, else any free port."""
    try:
        return free_port(preferred)
    except OSError:
        raise DemoError("no free TCP port on 127.0.0.1") from None


def _wait_port(port: int, proc: subprocess.Popen[Any], what: str, log: Path, timeout: float = 90.0) -> None:
    try:
        wait_port(port, proc, timeout, interval=0.2)
    except NotListening as e:
        if e.returncode is not None:
            raise DemoError(f"{what} exited with status {e.returncode}; see {log}") from None
        raise DemoError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s; see {log}") from None


def _config(directory: Path, info: dict[str, Any], ldap_port: int, pages_port: int, smtp_port: int) -> str:
    var = directory / "var"
    return f"""# Written by `ldapsync demo`: the server wired to a fake Microsoft 365 tenant and an SMTP sink.
[directory]
suffix = "{SUFFIX}"
database = "sqlite:///{var / 'ldapsync.db'}"
[ldap]
listen = ["tcp:{ldap_port}:interface=127.0.0.1"]
[admin]
password_file = "{var / 'admin-password'}"
[secrets]
key_file = "{var / 'secret.key'}"
[selfservice]
listen = "tcp:{pages_port}:interface=127.0.0.1"
public_url = "http://127.0.0.1:{pages_port}"
[mail]
smtp = "tcp:127.0.0.1:{smtp_port}"
from = "ldapsync@{DOMAIN}"
admin_address = "it@{DOMAIN}"
[office365]
enabled = true
tenant = "{info['tenant']}"
client_id = "{info['client_id']}"
client_secret_file = "{info['client_secret_file']}"
authority = "{info['authority']}"
graph_url = "{info['graph_url']}"
ca_bundle = "{info['ca_file']}"
reconcile_interval = "10s"
"""


class Demo:
    """The three processes of the demo, started in order and stopped in reverse."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.tenant: FakeTenantProcess | None = None
        self.procs: list[tuple[str, subprocess.Popen[Any]]] = []
        self.lines: list[str] = []

    def _spawn(self, what: str, argv: list[str], log: Path) -> subprocess.Popen[Any]:
        out = open(log, "ab")
        env = {k: v for k, v in os.environ.items() if k not in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "LDAPSYNC_CONFIG")}
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.dir, env=env,
                                start_new_session=True)   # Ctrl-C reaches the demo, which stops them in order
        out.close()
        self.procs.append((what, proc))
        return proc

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "var").mkdir(mode=0o700, exist_ok=True)
        (self.dir / "mail").mkdir(exist_ok=True)
        self.tenant = FakeTenantProcess(self.dir / "tenant", port=_port(8443), extra_args=["--device-auto-approve"])
        self.tenant.start(timeout=60)
        info = self.tenant.info
        self.tenant.admin.add_domain(name=DOMAIN, verified=True)

        smtp_port = _port(2525)
        sink = self._spawn("the SMTP sink", [sys.executable, "-m", "ldapsync.testing.smtp_sink", "--port", str(smtp_port),
                                             "--maildir", str(self.dir / "mail")], self.dir / "smtp-sink.log")
        _wait_port(smtp_port, sink, "the SMTP sink", self.dir / "smtp-sink.log")

        ldap_port, pages_port = _port(10389), _port(8080)
        config = self.dir / "ldapsync.toml"
        config.write_text(_config(self.dir, info, ldap_port, pages_port, smtp_port), encoding="utf-8")
        (self.dir / "demo.json").write_text(json.dumps({
            "tenant_url": info["base_url"], "ca_file": info["ca_file"], "admin_token_file": info["admin_token_file"],
        }, indent=2) + "\n", encoding="utf-8")

        bindir = Path(sys.executable).parent
        # `init` first: only it creates a database; the other commands refuse a missing one.
        for step in (["init"], ["o365", "authorize"]):
            done = subprocess.run([str(bindir / "ldapsync"), "--config", str(config), *step], cwd=self.dir,
                                  capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise DemoError(f"ldapsync {' '.join(step)} failed: {(done.stdout + done.stderr).strip()}")
        log = self.dir / "ldapsync.log"
        server = self._spawn("the server", [str(bindir / "twistd"), "--nodaemon", "--pidfile=", "--logfile", str(log),
                                            "ldapsync", "--config", str(config)], self.dir / "twistd.out")
        _wait_port(ldap_port, server, "the LDAP server", log, timeout=120)
        _wait_port(pages_port, server, "the self-service pages", log)
        self.lines = [
            f"ldap: ldap://127.0.0.1:{ldap_port}",
            f"admin dn: cn=admin,{SUFFIX}",
            f"admin password file: {self.dir / 'var' / 'admin-password'}",
            f"pages: http://127.0.0.1:{pages_port}",
            f"mail: {self.dir / 'mail'}",
            f"tenant: {info['base_url']}",
            f"config: {config}",
            f"log: {log}",
        ]

    def stop(self) -> None:
        for _what, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _what, proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if self.tenant is not None:
            self.tenant.stop()
            self.tenant = None

    def alive(self) -> str | None:
        """None while every part runs, else which one stopped."""
        for what, proc in self.procs:
            if proc.poll() is not None:
                return what
        if self.tenant is not None and self.tenant.proc is not None and self.tenant.proc.poll() is not None:
            return "the fake tenant"
        return None


def try_next(ldap_url: str, password_file: str) -> str:
    return f"""
Try it (in another terminal): add a user bound to Microsoft 365, then look at both sides.
ldapadd -x -H {ldap_url} -D cn=admin,{SUFFIX} -y {password_file} <<'EOF'
dn: uid=alice,ou=people,{SUFFIX}
objectClass: inetOrgPerson
objectClass: ldapsyncUser
uid: alice
cn: Alice Smith
sn: Smith
givenName: Alice
mail: alice@{DOMAIN}
userPassword: Correct-Horse-7
ldapsyncDirectory: office365
EOF
ldapsearch -x -H {ldap_url} -D cn=admin,{SUFFIX} -y {password_file} -b ou=people,{SUFFIX} '(uid=alice)' o365SyncState o365ObjectId
ldapsync demo users --dir DIR

Ctrl-C stops the server, the tenant and the SMTP sink."""


def run(directory: str | None) -> int:
    """``ldapsync demo [--dir DIR]``: start everything, print where it is, wait for Ctrl-C."""
    path = Path(directory).resolve() if directory else Path(tempfile.mkdtemp(prefix="ldapsync-demo-"))
    demo = Demo(path)
    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        demo.start()
        for line in demo.lines:
            print(line)
        print(try_next(demo.lines[0].split(": ", 1)[1], str(path / "var" / "admin-password")).replace("DIR", str(path)),
              flush=True)
        while not stopping:
            gone = demo.alive()
            if gone:
                print(f"ldapsync demo: {gone} stopped; stopping the rest (logs in {path})", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    except DemoError as e:
        print(f"ldapsync demo: {e}", file=sys.stderr)
        return 1
    finally:
        demo.stop()
        print(f"stopped; everything is kept in {path}", file=sys.stderr)


def users(directory: str) -> int:
    """``ldapsync demo users --dir DIR``: the fake tenant's users, one per line."""
    try:
        meta = json.loads((Path(directory) / "demo.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"ldapsync demo users: no running demo in {directory} ({e.__class__.__name__}: cannot read demo.json)",
              file=sys.stderr)
        return 1
    token = Path(meta["admin_token_file"]).read_text(encoding="utf-8").strip()
    client = AdminClient(meta["tenant_url"], meta["ca_file"], token)
    try:
        listed = client.all_users()
    except OSError as e:
        print(f"ldapsync demo users: the fake tenant at {meta['tenant_url']} does not answer ({e.__class__.__name__})",
              file=sys.stderr)
        return 1
    finally:
        client.close()
    print(f"{'userPrincipalName':40} {'enabled':8} {'displayName':24} mailNickname")
    for u in sorted(listed, key=lambda u: str(u.get("userPrincipalName", "")).lower()):
        print(f"{u.get('userPrincipalName', ''):40} {str(u.get('accountEnabled')).lower():8} "
              f"{u.get('displayName') or '':24} {u.get('mailNickname') or ''}")
    return 0
