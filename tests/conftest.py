"""Shared fixtures: a really listening ldapsync server (twistd subprocess) on SQLite or PostgreSQL.

PostgreSQL comes from ``LDAPSYNC_TEST_PG_URL`` (an admin URL; each server gets a
fresh database).  ``tests/setup-and-run.sh`` sets it; a run without it fails
the PostgreSQL tests loudly rather than skipping them.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
from helpers import ADMIN_DN, SUFFIX
from perf.loadgen import child_pids  # the /proc walk the benchmarks use for server CPU

from ldapsync.testing import ports  # free_port/wait_port: one copy, shared with `ldapsync demo`


def free_port() -> int:
    return ports.free_port()


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0, log: Path | None = None) -> None:
    try:
        ports.wait_port(port, proc, timeout)
    except ports.NotListening as e:
        what = f"server exited with {e.returncode}" if e.returncode is not None else f"port {port} not listening after {timeout}s"
        raise RuntimeError(f"{what}:\n{log.read_text() if log else ''}") from None


def make_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost: (ca.pem, cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ldapsync test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    ca_p, cert_p, key_p = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca_p.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_p.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_p.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca_p, cert_p, key_p


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_cert(tmp_path_factory.mktemp("tls"))


def pg_admin_url() -> str:
    url = os.environ.get("LDAPSYNC_TEST_PG_URL")
    if not url:
        pytest.fail("LDAPSYNC_TEST_PG_URL is not set: run the tests with tests/setup-and-run.sh, which starts PostgreSQL")
    return url


def create_pg_database() -> tuple[str, str]:
    """A fresh database: (sqlalchemy url, name)."""
    import sqlalchemy as sa

    admin = pg_admin_url()
    name = "ldapsync_t_" + uuid.uuid4().hex[:12]
    eng = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    eng.dispose()
    return admin.rsplit("/", 1)[0] + "/" + name, name


def drop_pg_database(name: str) -> None:
    """Drop a test database.  WITH (FORCE) cannot end a server process of another role (an
    autovacuum worker right after a heavy test): that is waited out, with a bound."""
    import sqlalchemy as sa

    eng = sa.create_engine(pg_admin_url(), isolation_level="AUTOCOMMIT")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with eng.connect() as c:
                    c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                return
            except sa.exc.DBAPIError as e:
                if "must be a member of the role" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        eng.dispose()


@contextlib.contextmanager
def fresh_database(backend: str, directory: Path, *, migrated: bool = True) -> Iterator:
    """A ``Database`` on a fresh SQLite file (``directory/d.db``) or PostgreSQL database, with the
    schema unless ``migrated=False``; stopped (and the PostgreSQL database dropped) afterwards."""
    from ldapsync.store.database import Database

    pg = None
    if backend == "sqlite":
        url = f"sqlite:///{directory / 'd.db'}"
    else:
        url, pg = create_pg_database()
    database = Database(url)
    try:
        if migrated:
            database.create_schema()
        yield database
    finally:
        database.stop()
        if pg:
            drop_pg_database(pg)


def split_table(extra: str, table: str) -> tuple[str, str]:
    """(keys of the ``[table]`` table in ``extra``, the rest): the generated config already has
    that table and TOML forbids a second one, so its keys are merged into it."""
    picked: list[str] = []
    rest: list[str] = []
    cur = rest
    for line in extra.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and not stripped.startswith("[["):
            cur = picked if stripped == f"[{table}]" else rest
            if cur is picked:
                continue
        cur.append(line)
    return "\n".join(picked), "\n".join(rest)


def split_ldap_table(extra: str) -> tuple[str, str]:
    return split_table(extra, "ldap")


@dataclass
class Server:
    workdir: Path
    backend: str
    db_url: str
    port: int
    ldaps_port: int
    ca: Path
    config_path: Path
    admin_password: str = ""
    proc: subprocess.Popen | None = None
    extra_config: str = ""
    env: dict[str, str] = field(default_factory=dict)
    web_port: int = field(default_factory=lambda: free_port())
    started: bool = False          # once started, the ports are the server's: a restart keeps them

    def __post_init__(self) -> None:
        # The server's policy clock (password expiry, lockout, link expiry) can be moved
        # forward by tests: see ldapsync/clock.py.
        self.env.setdefault("LDAPSYNC_TEST_CLOCK_FILE", str(self.clock_file))

    @property
    def clock_file(self) -> Path:
        return self.workdir / "clock-offset"

    def advance_clock(self, seconds: float) -> None:
        """Move this server's (and its CLI's) clock ``seconds`` forward; takes effect at once."""
        current = float(self.clock_file.read_text() or 0) if self.clock_file.exists() else 0.0
        self.clock_file.write_text(f"{current + seconds}\n")

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    @property
    def log(self) -> Path:
        return self.workdir / "server.log"

    def client_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"LDAPTLS_CACERT": str(self.ca), "LDAPTLS_REQCERT": "demand", "LDAPCONF": "/dev/null", "LDAPRC": "/dev/null"})
        return env

    def run(self, tool: str, *args: str, input: str | None = None, bind: str | None = ADMIN_DN,
            password: str | None = None, url: str | None = None, check: bool = False) -> subprocess.CompletedProcess:
        """Run an ldap-utils tool against this server (as admin unless told otherwise)."""
        cmd = [tool, "-x", "-H", url or self.url]
        if bind is not None:
            cmd += ["-D", bind, "-w", password if password is not None else self.admin_password]
        cmd += list(args)
        p = subprocess.run(cmd, input=input, capture_output=True, text=True, env=self.client_env(), timeout=60)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd[:3])} ... failed ({p.returncode}): {p.stdout}\n{p.stderr}")
        return p

    def cli(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ldapsync"), "--config", str(self.config_path), *args],
                              input=input, capture_output=True, cwd=self.workdir, timeout=600,
                              env={**os.environ, **self.env})

    def write_config(self) -> None:
        ldap_keys, extra = split_ldap_table(self.extra_config)
        if not re.search(r"^\s*processes\s*=", ldap_keys, re.M):
            # one LDAP process unless a test asks for more (the default is one per CPU): the
            # tests of per-process limits (connections, wrong passwords per address) count on it
            ldap_keys = "processes = 1\n" + ldap_keys
        web_keys, extra = split_table(extra, "selfservice")
        if "listen" not in web_keys:
            web_keys = f'listen = "tcp:{self.web_port}:interface=127.0.0.1"\n' + web_keys
        if "public_url" not in web_keys:
            web_keys = f'public_url = "{self.web_url}"\n' + web_keys
        self.config_path.write_text(
            f"""
[directory]
suffix = "{SUFFIX}"
database = "{self.db_url}"
[ldap]
listen = ["tcp:{self.port}:interface=127.0.0.1", "ssl:{self.ldaps_port}:interface=127.0.0.1:privateKey={self.workdir / 'tls' / 'key.pem'}:certKey={self.workdir / 'tls' / 'cert.pem'}"]
starttls_cert = "{self.workdir / 'tls' / 'cert.pem'}"
starttls_key = "{self.workdir / 'tls' / 'key.pem'}"
{ldap_keys}
[admin]
password_file = "{self.workdir / 'admin-password'}"
[passwords]
hash_time_cost = 1
hash_memory_kib = 8192
[selfservice]
{web_keys}
{extra}
"""
        )

    def start(self) -> None:
        for attempt in range(3):
            self.write_config()
            logged = self.log.stat().st_size if self.log.exists() else 0
            self.proc = subprocess.Popen(
                [str(BIN / "twistd"), "-n", "--pidfile=", "ldapsync", "--config", str(self.config_path)],
                cwd=self.workdir, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env={**os.environ, **self.env},
            )
            try:
                wait_port(self.port, self.proc, log=self.log)
                wait_port(self.ldaps_port, self.proc, log=self.log)
            except RuntimeError:
                # free_port() hands out a port another process on the machine may take before the
                # server binds it: on a first start only, take new ports and try again
                with open(self.log, "rb") as f:
                    f.seek(logged)
                    collided = b"Address already in use" in f.read()
                if not collided or self.started or attempt == 2:
                    raise
                self.port, self.ldaps_port, self.web_port = free_port(), free_port(), free_port()
                continue
            break
        self.started = True
        self.admin_password = (self.workdir / "admin-password").read_text().rstrip("\n")

    def stop(self, sig: int = 15) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pids(self) -> list[int]:
        """The server's process and its children (the Microsoft 365 worker process)."""
        if self.proc is None:
            return []
        return [self.proc.pid, *child_pids(self.proc.pid)]

    def signal_all(self, sig: int) -> None:
        """Signal the whole node, e.g. SIGSTOP to freeze it (the worker process is a child)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def _make_server(tmp: Path, backend: str, tls_files: tuple[Path, Path, Path], extra_config: str = "") -> tuple[Server, str | None]:
    (tmp / "tls").mkdir(parents=True, exist_ok=True)
    for p in tls_files:
        shutil.copy(p, tmp / "tls" / p.name)
    pg_name = None
    if backend == "sqlite":
        db_url = f"sqlite:///{tmp / 'ldapsync.db'}"
    else:
        db_url, pg_name = create_pg_database()
    srv = Server(tmp, backend, db_url, free_port(), free_port(), tmp / "tls" / "ca.pem", tmp / "ldapsync.toml", extra_config=extra_config)
    return srv, pg_name


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tls_files: tuple[Path, Path, Path]) -> Iterator[Server]:
    """A running server shared by a test module, once per database backend."""
    srv, pg_name = _make_server(tmp_path_factory.mktemp(f"srv-{request.param}"), request.param, tls_files,
                                getattr(request.module, "SERVER_CONFIG", ""))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        if pg_name:
            drop_pg_database(pg_name)


@pytest.fixture
def make_server(tmp_path_factory: pytest.TempPathFactory, tls_files: tuple[Path, Path, Path]) -> Iterator:
    """Factory for a private server (backend, extra TOML) stopped at test end."""
    made: list[tuple[Server, str | None]] = []

    def make(backend: str = "sqlite", extra_config: str = "", start: bool = True) -> Server:
        srv, pg = _make_server(tmp_path_factory.mktemp(f"priv-{backend}"), backend, tls_files, extra_config)
        made.append((srv, pg))
        if start:
            srv.start()
        else:
            srv.write_config()
        return srv

    yield make
    for srv, pg in made:
        srv.stop()
        if pg:
            drop_pg_database(pg)




@pytest.fixture
def make_cluster(tmp_path_factory: pytest.TempPathFactory, tls_files: tuple[Path, Path, Path]) -> Iterator:
    """Factory for a multi-node deployment: ``n`` servers on ONE fresh PostgreSQL database.

    The nodes share what a real multi-node setup must share besides the database: the admin
    password file's content and the ``[secrets]`` key (queued passwords are encrypted with it, and
    any node may deliver them).  Nodes start one after the other (``start=True``); each has its
    own workdir, ports and log.  All are stopped and the database dropped at test end.
    """
    made: list[Server] = []
    dbs: list[str] = []

    def make(n: int = 2, extra_config: str = "", start: bool = True) -> list[Server]:
        db_url, name = create_pg_database()
        dbs.append(name)
        shared = tmp_path_factory.mktemp("cluster")
        if "[secrets]" not in extra_config:
            key_file = shared / "secret.key"
            extra_config += f'\n[secrets]\nkey_file = "{key_file}"\n'
        admin_password = uuid.uuid4().hex + "-Aa1!"
        nodes = []
        for i in range(n):
            tmp = tmp_path_factory.mktemp(f"node{i}")
            (tmp / "tls").mkdir(parents=True, exist_ok=True)
            for p in tls_files:
                shutil.copy(p, tmp / "tls" / p.name)
            pw_file = tmp / "admin-password"
            pw_file.write_text(admin_password + "\n")
            pw_file.chmod(0o600)
            srv = Server(tmp, "postgresql", db_url, free_port(), free_port(), tmp / "tls" / "ca.pem",
                         tmp / "ldapsync.toml", extra_config=extra_config)
            made.append(srv)
            nodes.append(srv)
        for srv in nodes:
            if start:
                srv.start()
            else:
                srv.write_config()
        return nodes

    yield make
    for srv in made:
        srv.stop()
    for name in dbs:
        drop_pg_database(name)


@pytest.fixture
def fake_tenant(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """The fake Microsoft 365 tenant in its own process (HTTPS, real MSAL-compatible)."""
    from ldapsync.testing.client import FakeTenantProcess

    proc = FakeTenantProcess(tmp_path_factory.mktemp("tenant"), extra_args=["--device-auto-approve"])
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@dataclass
class SinkProcess:
    port: int
    maildir: Path
    proc: subprocess.Popen

    @property
    def endpoint(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def messages(self) -> list:
        from ldapsync.testing.smtp_sink import read_maildir

        return read_maildir(self.maildir)

    def wait_for(self, count: int, timeout: float = 30.0) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.messages()
            if len(got) >= count:
                return got
            time.sleep(0.2)
        raise AssertionError(f"expected {count} mail(s) in the SMTP sink, got {len(self.messages())}")


@pytest.fixture
def smtp_sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SinkProcess]:
    """A real SMTP server on loopback that writes what it receives to a maildir."""
    yield from run_smtp_sink(tmp_path_factory)


def run_smtp_sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SinkProcess]:
    """Start a sink process, yield it, stop it (for fixtures of any scope)."""
    d = tmp_path_factory.mktemp("mail")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ldapsync.testing.smtp_sink", "--port", str(port), "--maildir", str(d)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        yield SinkProcess(port, d, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def office365_config(info: dict, **extra: object) -> str:
    """An [office365] section pointing at a fake tenant's ``info``."""
    lines = [
        "[office365]", "enabled = true", 'tenant = "contoso.onmicrosoft.com"',
        f'client_id = "{info["client_id"]}"', f'client_secret_file = "{info["client_secret_file"]}"',
        f'authority = "{info["authority"]}"', f'graph_url = "{info["graph_url"]}"', f'ca_bundle = "{info["ca_file"]}"',
    ]
    for k, v in extra.items():
        lines.append(f"{k} = {v!r}".replace("'", '"') if isinstance(v, str) else f"{k} = {str(v).lower() if isinstance(v, bool) else v}")
    return "\n".join(lines) + "\n"
