#!/usr/bin/env python3
"""Propagation benchmark (issue 4): LDAP modify → outbox → worker → Graph, end to end.

    python tests/perf/bench_propagation.py [--users 2000] [--backlog 10000]
        [--scenarios latency,backlog,budget,throttle,modify-cost] [--samples 200]
        [--budget 300 --window 15 --windows 3] [--server-pacing production|off]
        [--throttle-budget 40 --throttle-window 10]
        [--database sqlite|postgresql+psycopg://USER:PW@HOST:PORT/DB] [--nodes N]

Starts the fake Microsoft 365 tenant (``python -m ldapsync.testing.tenant``, its
own process) and an ldapsync server (``twistd`` subprocess, SQLite,
``[office365]`` pointing at the fake), loads N bound users and waits until all
are linked, then measures:

``latency``      one modify at a time on an idle system: LDAP ModifyResponse →
                 the fake tenant's receipt of the PATCH carrying the new value.
``backlog``      the tenant is made unreachable (SIGSTOP), B modifies are made,
                 the tenant is let go (SIGCONT): time until it has received every
                 user's final value; LDAP changes/s and Graph requests/s.
``budget``       the same with the fake's write budget enforced (scaled: 600 writes
                 per 30 s = Graph's 20 writes/s): writes/s, ratio to 20/s, 429s.
``throttle``     the same with the fake giving far less than ``write_budget`` (default
                 40 writes per 10 s, a fifth of the 20/s the server is configured for:
                 another app in the tenant, a smaller budget than documented): users
                 arrived, 429s per write attempt, the share of that real budget used.
``modify-cost``  LDAP modify ops/s (raw loadgen, 16 connections) with
                 ``[office365] enabled = false`` vs ``true`` (worker live) vs ``true`` with
                 the tenant stopped, on the same data: ``--rounds`` rounds, the order
                 rotating, each phase on a fresh server (and an empty queue); the summary
                 gives each round's cost and the median.

``--database`` a PostgreSQL URL: the benchmark creates a scratch database on that
server (the URL's user needs CREATEDB) and drops it at the end; ``--nodes N``
then runs N server processes on it (each with its Microsoft 365 worker), the
backlog writer spreading its connections over them.  ``modify-cost`` is SQLite
only (it restores a file snapshot before each phase).

Prints a "machine" line, a "setup" line and one JSON line per scenario on
stdout; progress goes to stderr.  A benchmark, not a test: it fails only when
something cannot be set up.  See tests/perf/README.md.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import select
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_graph  # machine_info, background_cpu_pct
import loadgen

SUFFIX = "dc=example,dc=com"
ADMIN_DN = "cn=admin," + SUFFIX
ADMIN_PASSWORD = "bench-admin-secret"
USER_PASSWORD = "bench-user-secret"
HOST = "127.0.0.1"
DOMAIN = "contoso.com"           # a verified domain of the demo tenant
SCENARIOS = ("latency", "backlog", "budget", "throttle", "modify-cost")
GRAPH_BUDGET_PER_S = 20.0        # Graph: 3,000 writes / 150 s per app and tenant
MAX_DRAIN_S = 1800.0             # hard bound on waiting for a backlog to drain


def log(msg: str) -> None:
    print("[bench] " + msg, file=sys.stderr, flush=True)


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def ms(x: float) -> float:
    return round(x * 1000.0, 3)


def pct(vals: list[float], p: float) -> float | None:
    return loadgen.percentile(vals, p) if vals else None


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def ssha(password: str, salt: bytes) -> str:
    d = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(d + salt).decode()


def uid_of(i: int) -> str:
    return loadgen.uid_of(i)


def user_dn(i: int) -> str:
    return loadgen.user_dn(i, SUFFIX)


def display_name(i: int) -> str:
    return f"Bench User {i:06d}"


def write_ldif(path: Path, users: int, seed: int = 42) -> None:
    """Bound users (``ldapsyncDirectory: office365``) with {SSHA} passwords and mail on contoso.com."""
    rnd = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(1, users + 1):
            uid = uid_of(i)
            f.write(
                f"dn: {user_dn(i)}\n"
                "objectClass: top\nobjectClass: person\nobjectClass: organizationalPerson\n"
                "objectClass: inetOrgPerson\nobjectClass: ldapsyncUser\n"
                f"uid: {uid}\ncn: {display_name(i)}\nsn: User{i:06d}\ngivenName: Bench\n"
                f"mail: {uid}@{DOMAIN}\n"
                f"userPassword: {ssha(USER_PASSWORD, rnd.randbytes(8))}\n"
                "ldapsyncDirectory: office365\n\n"
            )


def seed_tenant(admin: Any, users: int) -> None:
    """The same users in the fake tenant, with exactly the values ldapsync would write, so
    linking them (soft match) costs one GET and no write."""
    for i in range(1, users + 1):
        upn = f"{uid_of(i)}@{DOMAIN}"
        admin.add_user(upn=upn, display_name=display_name(i), givenName="Bench", surname=f"User{i:06d}",
                       mail=upn, passwordPolicies="DisablePasswordExpiration")


def office365_config(info: dict, **extra: Any) -> str:
    """As ``tests/conftest.py:office365_config`` (not imported: that module needs pytest)."""
    lines = [
        "[office365]", "enabled = true", 'tenant = "contoso.onmicrosoft.com"',
        f'client_id = "{info["client_id"]}"', f'client_secret_file = "{info["client_secret_file"]}"',
        f'authority = "{info["authority"]}"', f'graph_url = "{info["graph_url"]}"', f'ca_bundle = "{info["ca_file"]}"',
    ]
    for k, v in extra.items():
        lines.append(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {str(v).lower() if isinstance(v, bool) else v}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Raw-socket LDAP (setup and the count-bounded backlog writer)
# --------------------------------------------------------------------------


class LdapConn:
    """One blocking connection bound as admin, for one-at-a-time modifies."""

    def __init__(self, port: int, timeout: float = 30.0):
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.msgid = 1
        got = loadgen._blocking_roundtrip(self.sock, loadgen.frame(1, loadgen.bind_op(ADMIN_DN, ADMIN_PASSWORD)),
                                          timeout)
        if got[-1] != (loadgen.T_BIND_RESP, 0):
            raise RuntimeError(f"admin bind failed: {got[-1]}")

    def modify(self, i: int, attr: str, value: str) -> int:
        self.msgid += 1
        got = loadgen._blocking_roundtrip(self.sock, loadgen.frame(self.msgid, loadgen.modify_op(user_dn(i), attr, value)),
                                          self.timeout)
        tag, rc = got[-1]
        if tag != loadgen.T_MOD_RESP:
            raise RuntimeError(f"unexpected response tag 0x{tag:02x}")
        return rc

    def close(self) -> None:
        try:
            self.sock.sendall(loadgen.frame(self.msgid + 1, loadgen.UNBIND))
        except OSError:
            pass
        self.sock.close()


def send_modifies(ports: list[int], changes: list[tuple[int, str]], conns: int, timeout: float) -> dict:
    """Replace displayName for each (user, value) in ``changes``: ``conns`` connections in one
    epoll loop (spread round-robin over ``ports``: the nodes), one outstanding modify each,
    changes handed out in order.  Bounded by count and ``timeout``.  Returns ops, errors, wall
    time, latencies."""
    socks: dict[int, tuple[socket.socket, bytearray]] = {}
    state: dict[int, list] = {}                       # fd → [msgid, t_sent]
    ep = select.epoll()
    for k in range(min(conns, len(changes))):
        s = socket.create_connection((HOST, ports[k % len(ports)]), timeout=30)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        got = loadgen._blocking_roundtrip(s, loadgen.frame(1, loadgen.bind_op(ADMIN_DN, ADMIN_PASSWORD)), 30)
        if got[-1] != (loadgen.T_BIND_RESP, 0):
            raise RuntimeError(f"admin bind failed: {got[-1]}")
        s.setblocking(False)
        socks[s.fileno()] = (s, bytearray())
        state[s.fileno()] = [1, 0.0]
        ep.register(s.fileno(), select.EPOLLIN)
    nxt = 0
    done = errors = 0
    kinds: dict[str, int] = {}
    lat: list[float] = []

    def send(fd: int) -> None:
        nonlocal nxt
        i, value = changes[nxt]
        nxt += 1
        st = state[fd]
        st[0] += 1
        st[1] = time.monotonic()
        socks[fd][0].send(loadgen.frame(st[0], loadgen.modify_op(user_dn(i), "displayName", value)))

    t0 = time.monotonic()
    deadline = t0 + timeout
    outstanding = 0
    for fd in list(socks):
        if nxt < len(changes):
            send(fd)
            outstanding += 1
    for _ in range(len(changes) * 4 + 100000):       # bounded
        if outstanding == 0 or time.monotonic() > deadline:
            break
        for fd, _ev in ep.poll(0.5):
            s, buf = socks[fd]
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                raise RuntimeError("the server closed an LDAP connection")
            buf += data
            for tag, rc in loadgen.parse_messages(buf):
                if tag != loadgen.T_MOD_RESP:
                    continue
                outstanding -= 1
                done += 1
                lat.append(time.monotonic() - state[fd][1])
                if rc != 0:
                    errors += 1
                    kinds[f"modify_rc_{rc}"] = kinds.get(f"modify_rc_{rc}", 0) + 1
                if nxt < len(changes):
                    send(fd)
                    outstanding += 1
    wall = time.monotonic() - t0
    for s, _ in socks.values():
        s.close()
    ep.close()
    lat.sort()
    out = {"ops": done, "errors": errors, "wall_s": wall, "p50": pct(lat, 50), "p99": pct(lat, 99)}
    if kinds:
        out["error_kinds"] = kinds
    if done < len(changes):
        out["unfinished"] = len(changes) - done
    return out


class DisplayNameTemplates(loadgen.Templates):
    """loadgen's templates, but ``modify`` replaces displayName (a value that matters to
    Microsoft 365, so each modify of a bound user writes an outbox row) instead of description."""

    def __init__(self, suffix: str, password: str):
        super().__init__(suffix, password)
        mod = loadgen.modify_op(f"uid=user@@@@@@,ou=people,{suffix}", "displayName", "Bench " + "#" * 10)
        a, b = mod.split(b"@@@@@@")
        b1, b2 = b.split(b"#" * 10)
        self.modify = (a, b1, b2)


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, work: Path, users: int, info: dict, bin_dir: str | None, pacing: str,
                 db_url: str | None = None, name: str = "ldapsync"):
        self.dir = work / name
        self.dir.mkdir()
        self.name = name
        self.db_url = db_url                  # PostgreSQL (shared by the nodes); None: SQLite in self.dir
        self.key_file = work / "secret.key"   # shared: any node may deliver a queued password
        self._engine: Any = None
        self.users = users
        self.info = info
        self.port = free_port()
        self.db_path = self.dir / "ldapsync.db"
        self.conf = self.dir / "ldapsync.toml"
        self.log = self.dir / "ldapsync.log"
        self.proc: subprocess.Popen | None = None
        self.pacing = pacing
        bindir = Path(bin_dir) if bin_dir else Path(sys.executable).parent
        self.python = str(bindir / "python") if (bindir / "python").exists() else sys.executable
        self.twistd = str(bindir / "twistd") if (bindir / "twistd").exists() else (shutil.which("twistd") or "twistd")
        self.cli = str(bindir / "ldapsync") if (bindir / "ldapsync").exists() else (shutil.which("ldapsync") or "ldapsync")

    def write_conf(self, enabled: bool) -> None:
        pw = self.dir / "admin-password"
        pw.write_text(ADMIN_PASSWORD + "\n")
        pw.chmod(0o600)
        # --server-pacing off: [office365] write_budget = 0 (no client-side pacing; the fake is unthrottled)
        o365 = office365_config(self.info, reconcile_interval=3600,
                                **({"write_budget": 0} if self.pacing == "off" else {}))
        if not enabled:
            o365 = o365.replace("enabled = true", "enabled = false")
        self.conf.write_text(
            f"""# generated by tests/perf/bench_propagation.py
[directory]
suffix = "{SUFFIX}"
database = "{self.db_url or f'sqlite:///{self.db_path}'}"
[ldap]
listen = ["tcp:{self.port}:interface={HOST}"]
processes = 1                     # one LDAP process (the default is one per CPU): figures comparable with earlier runs
[admin]
password_file = "{pw}"
[selfservice]
listen = ""                       # no pages: benchmarks must not take port 8080
[secrets]
key_file = "{self.key_file}"
{o365}"""
        )

    def run_cli(self, *args: str, timeout: float = 3600) -> float:
        cmd = [self.cli, "--config", str(self.conf), *args]
        log("running: " + " ".join(cmd))
        t0 = time.monotonic()
        with open(self.log, "ab") as lf:
            r = subprocess.run(cmd, cwd=self.dir, stdout=lf, stderr=subprocess.STDOUT, timeout=timeout, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])} exited with {r.returncode}; log tail:\n"
                               + self.log.read_text(errors="replace")[-2000:])
        return time.monotonic() - t0

    def start(self, enabled: bool) -> None:
        self.write_conf(enabled)
        cmd = [self.twistd, "-n", "--pidfile=", "ldapsync", "--config", str(self.conf)]
        log(f"starting {self.name} ([office365] enabled = {str(enabled).lower()}, pacing {self.pacing})")
        with open(self.log, "ab") as lf:
            self.proc = subprocess.Popen(cmd, cwd=self.dir, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        last = ""
        for _ in range(600):
            if self.proc.poll() is not None:
                raise RuntimeError(f"ldapsync exited with {self.proc.returncode}; log tail:\n"
                                   + self.log.read_text(errors="replace")[-2000:])
            try:
                last = loadgen.probe(HOST, self.port, SUFFIX, uid_of(1), ADMIN_DN, ADMIN_PASSWORD, timeout=5)
                if not last:
                    return
            except (OSError, RuntimeError) as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        raise RuntimeError(f"ldapsync not ready after 60 s: {last}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        log(f"stopping {self.name} (pid {self.proc.pid})")
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            log(f"ldapsync did not stop in 30 s, killing pid {self.proc.pid}")
            self.proc.kill()
            self.proc.wait(10)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def snapshot(self) -> None:
        """Keep a copy of the database (server stopped): modify-cost restores it before each phase."""
        if self.db_url:
            raise RuntimeError("modify-cost restores a SQLite file before each phase: SQLite only")
        con = sqlite3.connect(self.db_path, timeout=10)
        try:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            con.close()
        shutil.copyfile(self.db_path, self.db_path.with_suffix(".snapshot"))

    def restore(self) -> None:
        """Put the snapshot back (server stopped): every phase starts from the same database, so
        the table and index growth of earlier phases does not slow the later ones."""
        for extra in ("-wal", "-shm"):
            Path(f"{self.db_path}{extra}").unlink(missing_ok=True)
        shutil.copyfile(self.db_path.with_suffix(".snapshot"), self.db_path)

    def outbox(self) -> dict[str, int]:
        """Rows per state, read straight from the database (SQLite: read-only, WAL: no writer is blocked)."""
        if self.db_url:
            import sqlalchemy as sa

            if self._engine is None:
                self._engine = sa.create_engine(self.db_url, pool_size=1, max_overflow=0)
            with self._engine.connect() as c:
                return {s: n for s, n in c.exec_driver_sql("SELECT state, COUNT(*) FROM o365_outbox GROUP BY state")}
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            return {s: n for s, n in con.execute("SELECT state, COUNT(*) FROM o365_outbox GROUP BY state")}
        finally:
            con.close()


class Tenant:
    """FakeTenantProcess plus SIGSTOP/SIGCONT: 'unreachable' without errors, so nothing backs off."""

    def __init__(self, work: Path):
        from ldapsync.testing.client import FakeTenantProcess

        self.fake = FakeTenantProcess(work / "tenant")
        self.stopped = False

    def start(self) -> None:
        self.fake.start(timeout=30)

    @property
    def admin(self) -> Any:
        return self.fake.admin

    @property
    def pid(self) -> int:
        return self.fake.proc.pid

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.stopped = False

    def stop(self) -> None:
        if self.fake.proc is not None:
            if self.stopped:
                self.resume()
            log(f"stopping the fake tenant (pid {self.fake.proc.pid})")
        self.fake.stop()


def postgres_cpu_s() -> float:
    """CPU seconds of the live ``postgres`` processes (the servers' pooled connections live
    through a scenario, so their backends do too)."""
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/comm") as f:
                if f.read().strip() != "postgres":
                    continue
        except OSError:
            continue
        total += loadgen._ticks(int(d), False) or 0
    return total / os.sysconf("SC_CLK_TCK")


class CpuMarks:
    def __init__(self, servers: Server | list[Server], tenant: Tenant):
        self.servers = servers if isinstance(servers, list) else [servers]
        self.tenant = tenant
        self.t = time.monotonic()
        self.each = [loadgen._proc_cpu_s(s.pid) for s in self.servers]
        self.s = None if any(g is None for g in self.each) else sum(self.each)
        self.p = postgres_cpu_s() if any(s.db_url for s in self.servers) else None
        self.f = loadgen._proc_cpu_s(tenant.pid)
        self.m = loadgen._machine_busy()
        self.b = bench_graph.cpu_self()

    def fields(self, end: CpuMarks) -> dict:
        dt = max(1e-9, end.t - self.t)
        busy = end.m[0] - self.m[0]
        total = max(1, end.m[1] - self.m[1])
        out = {"server_cpu_pct": round(100 * (end.s - self.s) / dt, 1) if self.s is not None and end.s is not None else None,
               "tenant_cpu_pct": round(100 * (end.f - self.f) / dt, 1) if self.f is not None and end.f is not None else None,
               "bench_cpu_pct": round(100 * (end.b - self.b) / dt, 1),
               **({"postgres_cpu_pct": round(100 * (end.p - self.p) / dt, 1)} if self.p is not None else {}),
               "machine_cpu_pct": round(100.0 * (os.cpu_count() or 1) * busy / total, 1)}
        # everything else on the machine (other processes, loopback softirq): should be near 0
        known = sum(v for k, v in out.items() if k != "machine_cpu_pct" and v is not None)
        out["other_cpu_pct"] = round(max(0.0, out["machine_cpu_pct"] - known), 1)
        if len(self.servers) > 1 and self.s is not None and end.s is not None:
            # each node's share (its LDAP process and its worker): did they all deliver?
            out["node_cpu_pct"] = [round(100 * (e - b) / dt, 1) for b, e in zip(self.each, end.each)]
        return out


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, nodes: list[Server], tenant: Tenant):
        self.args = args
        self.nodes = nodes
        self.server = nodes[0]            # latency, modify-cost and the probes use the first node
        self.tenant = tenant
        self.run_no = 0

    # -- helpers
    def wait_outbox_empty(self, timeout: float, what: str) -> tuple[float, dict]:
        t0 = time.monotonic()
        last: dict = {}
        for _ in range(int(timeout / 0.1) + 1):
            last = self.server.outbox()
            if not last.get("ready") and not last.get("held"):
                return time.monotonic() - t0, last
            if self.server.proc is not None and self.server.proc.poll() is not None:
                raise RuntimeError("ldapsync exited")
            if time.monotonic() - t0 > timeout:
                break
            time.sleep(0.1)
        raise RuntimeError(f"{what}: outbox not drained after {timeout:.0f} s: {last}")

    def wait_patch(self, value: str, timeout: float) -> dict | None:
        """Poll the fake's request record (kept small by clear_requests) for the PATCH carrying value."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.02) + 1):
            for r in self.tenant.admin.requests(kind="graph", method="PATCH"):
                if (r.get("body") or {}).get("displayName") == value:
                    return r
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)
        return None

    def probe_pipeline(self, timeout: float = 60.0) -> float:
        """One modify and wait for its PATCH: the connector and worker are up."""
        self.tenant.admin.clear_requests()
        conn = LdapConn(self.server.port)
        t0 = time.monotonic()
        try:
            value = f"Probe {time.time():.6f}"
            rc = conn.modify(1, "displayName", value)
            if rc != 0:
                raise RuntimeError(f"probe modify failed: resultCode {rc}")
            if self.wait_patch(value, timeout) is None:
                raise RuntimeError(f"the probe change did not reach the fake tenant in {timeout:.0f} s "
                                   f"(see {self.server.log})")
        finally:
            conn.close()
        self.wait_outbox_empty(30, "probe")
        return time.monotonic() - t0

    # -- 1. latency
    def latency(self) -> dict:
        a = self.args
        admin = self.tenant.admin
        admin.configure_throttling(enabled=False)
        self.wait_outbox_empty(60, "latency (before)")
        rnd = random.Random(a.seed)
        conn = LdapConn(self.server.port)
        lat: list[float] = []
        ldap_rtt: list[float] = []
        missing = 0
        log(f"latency: {a.samples} samples, one modify at a time, {a.gap:g} s idle between")
        c0 = CpuMarks(self.nodes, self.tenant)
        try:
            for k in range(a.samples):
                admin.clear_requests()
                time.sleep(a.gap)                                 # idle: the previous job has finished
                i = rnd.randrange(a.users) + 1
                value = f"Lat {k:06d} {uid_of(i)}"
                t_send = time.time()
                rc = conn.modify(i, "displayName", value)
                t_resp = time.time()
                if rc != 0:
                    raise RuntimeError(f"modify {uid_of(i)} failed: resultCode {rc}")
                ldap_rtt.append(t_resp - t_send)
                r = self.wait_patch(value, a.sample_timeout)
                if r is None:
                    missing += 1
                    continue
                lat.append(r["time"] - t_resp)
        finally:
            conn.close()
        c1 = CpuMarks(self.nodes, self.tenant)
        lat.sort()
        ldap_rtt.sort()
        line = {
            "scenario": "latency",
            "users": a.users,
            "samples": len(lat),
            "missing": missing,
            "p50_ms": ms(pct(lat, 50)) if lat else None,
            "p90_ms": ms(pct(lat, 90)) if lat else None,
            "p99_ms": ms(pct(lat, 99)) if lat else None,
            "max_ms": ms(lat[-1]) if lat else None,
            "min_ms": ms(lat[0]) if lat else None,
            "target_p99_ms": 250,
            "ldap_modify_p50_ms": ms(pct(ldap_rtt, 50)),
            "ldap_modify_p99_ms": ms(pct(ldap_rtt, 99)),
            "gap_s": a.gap,
            "pacing": self.server.pacing,
            "measured": "fake tenant's arrival time of the PATCH with the new displayName − time the ModifyResponse was read",
        }
        line.update(c0.fields(c1))
        return line

    # -- 2./3. backlog and budget
    def _backlog(self, name: str, throttled: bool) -> dict:
        a = self.args
        admin = self.tenant.admin
        self.run_no += 1
        tag = f"{'BL' if not throttled else 'BU'}{self.run_no}"
        # throttle: the fake's budget is far below the server's write_budget (which stays at its default)
        budget, window = (a.throttle_budget, a.throttle_window) if name == "throttle" else (a.budget, a.window)
        if throttled:
            admin.configure_throttling(enabled=True, writes=budget, window=window)
        else:
            admin.configure_throttling(enabled=False)
        self.wait_outbox_empty(120, f"{name} (before)")
        admin.clear_requests()
        admin.reset_throttling()
        # change j → user (j mod N) + 1: every user gets backlog/N changes, spread over the run
        changes = [((j % a.users) + 1, f"{tag} {j:07d} {uid_of((j % a.users) + 1)}") for j in range(a.backlog)]
        final = {i: v for i, v in changes}
        log(f"{name}: fake tenant paused (SIGSTOP); {a.backlog} modifies over {a.conns} connections "
            f"to {len(final)} users, on {len(self.nodes)} node(s)")
        self.tenant.pause()
        try:
            t_p = time.monotonic()
            w = send_modifies([n.port for n in self.nodes], changes, a.conns, timeout=600)
            queued = self.server.outbox()
            pause_s = time.monotonic() - t_p
            if pause_s > 25:
                log(f"WARNING: the tenant was paused {pause_s:.0f} s; the Graph client's 30 s timeout may "
                    "have fired for the requests in flight (they are retried)")
        finally:                                          # no admin call while the tenant is paused
            t_restore = time.time()
            c0 = CpuMarks(self.nodes, self.tenant)
            self.tenant.resume()
        if w["errors"] or w.get("unfinished"):
            log(f"WARNING: {name}: {w['errors']} modify errors, {w.get('unfinished', 0)} unfinished")
        log(f"{name}: {w['ops']} modifies in {w['wall_s']:.1f} s ({w['ops'] / w['wall_s']:.0f}/s); "
            f"outbox {queued}; tenant resumed, waiting for the drain")
        # the fake's write window was reset before the pause and nothing was written since:
        # the budget starts empty at the resume
        timeout = min(MAX_DRAIN_S, 120 + a.backlog / (5.0 if not throttled else min(1.0, budget / window / 2)))
        _, left = self.wait_outbox_empty(timeout, name)
        c1 = CpuMarks(self.nodes, self.tenant)
        recs = admin.requests(kind="graph", batch_items=False)
        recs = [r for r in recs if r["time"] >= t_restore - 1.0]
        arrived: dict[int, float] = {}
        for r in recs:
            if r["method"] == "PATCH" and r["status"] == 204:
                v = (r.get("body") or {}).get("displayName")
                if isinstance(v, str) and v.startswith(tag + " "):
                    i = int(v.rsplit("user", 1)[1])
                    if final.get(i) == v:
                        arrived[i] = r["time"]
        missing = len(final) - len(arrived)
        t_done = max(arrived.values()) if arrived else time.time()
        drain = max(1e-6, t_done - t_restore)
        in_drain = [r for r in recs if t_restore - 1.0 <= r["time"] <= t_done]
        patches = [r for r in in_drain if r["method"] == "PATCH"]
        ok_writes = sorted(r["time"] for r in patches if r["status"] == 204)
        n429 = sum(1 for r in in_drain if r["status"] == 429)
        methods: dict[str, int] = {}
        for r in in_drain:
            methods[r["method"]] = methods.get(r["method"], 0) + 1
        line: dict[str, Any] = {
            "scenario": name,
            "users": a.users,
            "changes": w["ops"],
            "users_changed": len(final),
            "changes_per_user": round(w["ops"] / max(1, len(final)), 2),
            "ldap_modifies_per_s_while_paused": round(w["ops"] / w["wall_s"], 1) if w["wall_s"] else None,
            "ldap_errors": w["errors"],
            "tenant_paused_s": round(pause_s, 2),
            "outbox_rows_at_resume": sum(queued.values()),
            "drain_s": round(drain, 2),
            "changes_per_s": round(w["ops"] / drain, 1),
            "graph_requests": len(in_drain),
            "graph_requests_per_s": round(len(in_drain) / drain, 1),
            "graph_requests_by_method": methods,
            "patches": len(patches),
            "writes_ok": len(ok_writes),
            "writes_per_s": round(len(ok_writes) / drain, 2),
            "coalescing_changes_per_write": round(w["ops"] / max(1, len(ok_writes)), 2),
            "final_values_missing": missing,
            "throttled_429": n429,
            "outbox_left": left,
            "pacing": self.server.pacing,
        }
        if throttled:
            budget_rate = budget / window
            k = a.windows
            per_window = [0] * max(1, int(drain // window) + 1)
            for t in ok_writes:
                per_window[min(len(per_window) - 1, max(0, int((t - t_restore) // window)))] += 1
            full = [n for n in per_window[: int(drain // window)]]
            first_k = sum(per_window[:k]) if len(full) >= k else None
            max_in_window, jj = 0, 0
            for ii, t in enumerate(ok_writes):
                while ok_writes[jj] <= t - window:
                    jj += 1
                max_in_window = max(max_in_window, ii - jj + 1)
            line.update({
                "budget_writes": budget,
                "budget_window_s": window,
                "budget_writes_per_s": round(budget_rate, 2),
                "ratio_to_budget": round(len(ok_writes) / drain / budget_rate, 3),
                f"writes_per_s_first_{k}_windows": round(first_k / (k * window), 2) if first_k is not None else None,
                f"ratio_to_budget_first_{k}_windows": round(first_k / (k * window) / budget_rate, 3) if first_k is not None else None,
                "full_windows": len(full),
                "writes_per_window": per_window,
                "tenant_max_writes_in_any_window": max_in_window,
                "ratio_429_of_requests": round(n429 / max(1, len(in_drain)), 4),
                "ratio_429_of_write_attempts": round(n429 / max(1, len(patches)), 4),
                "target": ">= 0.9 of 20 writes/s, < 1% of requests answered 429",
            })
            if name == "throttle":
                line.update({
                    "users_arrived": len(arrived),
                    "write_attempts": len(patches),
                    "server_write_budget_per_s": round(GRAPH_BUDGET_PER_S, 2),   # the default write_budget
                    "target": "every user arrives, < 5% of write attempts answered 429, >= 0.9 of the real budget used",
                    "met": missing == 0 and n429 < 0.05 * max(1, len(patches)) and len(ok_writes) / drain >= 0.9 * budget_rate,
                })
            if len(full) < k:
                log(f"WARNING: {name}: the drain lasted {len(full)} full window(s) < {k}; use a larger --backlog")
        else:
            line["target_changes_per_s"] = 300
        line.update(c0.fields(c1))
        if throttled:
            admin.configure_throttling(enabled=False)
        admin.clear_requests()
        return line

    def backlog(self) -> dict:
        return self._backlog("backlog", throttled=False)

    def budget(self) -> dict:
        return self._backlog("budget", throttled=True)

    def throttle(self) -> dict:
        return self._backlog("throttle", throttled=True)

    # -- 4. modify cost
    def _modify_load(self, label: str) -> dict:
        a = self.args
        saved = loadgen.Templates
        loadgen.Templates = DisplayNameTemplates          # inherited by the forked client processes
        ob0 = self.server.outbox()
        try:
            r = loadgen.run_load(host=HOST, port=self.server.port, suffix=SUFFIX, scenario="modify", users=a.users,
                                 conns=a.conns, duration=a.duration, warmup=a.warmup, admin_dn=ADMIN_DN,
                                 admin_password=ADMIN_PASSWORD, user_password=USER_PASSWORD, procs=a.procs,
                                 server_pid=self.server.pid, seed=a.seed)
        finally:
            loadgen.Templates = saved
        ob1 = self.server.outbox()
        if r.get("machine_cpu_pct") is not None and r.get("server_cpu_pct") is not None:
            # the rest: the fake tenant (small), other processes, loopback softirq
            r["other_cpu_pct"] = round(max(0.0, r["machine_cpu_pct"] - r["server_cpu_pct"]
                                           - (r.get("client_cpu_pct") or 0.0)), 1)
        r["outbox_rows_before"] = sum(ob0.values())
        r["outbox_rows_after"] = sum(ob1.values())
        log(f"modify-cost ({label}): {r['ops_per_s']} modifies/s, p99 {r['p99_ms']} ms, errors {r['errors']}")
        return r

    def _modify_phase(self, mode: str) -> dict:
        """One modify-cost phase on a freshly started server: off | on | paused."""
        s = self.server
        s.stop()
        s.restore()               # the database as after setup: nothing queued, no growth from earlier phases
        s.start(enabled=mode != "off")
        if mode == "off":
            return self._modify_load("connector off")
        self.tenant.admin.configure_throttling(enabled=False)
        self.probe_pipeline()
        if mode == "on":
            return self._modify_load("connector on")
        self.tenant.pause()       # the worker's requests hang: only the outbox rows, no Graph traffic
        try:
            return self._modify_load("connector on, tenant paused")
        finally:
            self.tenant.resume()

    def modify_cost(self) -> list[dict]:
        """Rounds of off / on / on-with-the-tenant-stopped, the order rotating each round.

        The machine's speed drifts by ±10% within a minute (it is shared), as much as the effect
        measured, so one run per mode proves little.  Each round compares phases run back to back;
        the summary gives each round's cost and their median.  Every phase starts from a copy of
        the database as it was after setup: without it, each phase ran on the tables the earlier
        ones had grown, and whichever mode came later in a round looked ~10% slower."""
        a = self.args
        modes = [m for m in a.modify_modes.split(",") if m]
        out: list[dict] = []
        results: dict[str, list[dict]] = {m: [] for m in modes}
        base = {"scenario": "modify-cost", "users": a.users, "conns": a.conns, "duration_s": a.duration,
                "attribute": "displayName", "pacing": self.server.pacing}
        self.server.stop()
        self.server.snapshot()
        for rnd in range(a.rounds):
            order = modes[rnd % len(modes):] + modes[:rnd % len(modes)]
            for mode in order:
                r = self._modify_phase(mode)
                results[mode].append(r)
                out.append({**base, "round": rnd + 1, "connector": {"paused": "on-tenant-paused"}.get(mode, mode), **r})

        def med(xs: list[float]) -> float | None:
            xs = sorted(x for x in xs if x is not None)
            return round(statistics.median(xs), 1) if xs else None

        summary: dict[str, Any] = {"scenario": "modify-cost", "connector": "summary", "users": a.users,
                                   "conns": a.conns, "rounds": a.rounds, "duration_s": a.duration}
        for m in modes:
            summary[f"ops_per_s_{m}"] = [r["ops_per_s"] for r in results[m]]
            summary[f"server_cpu_us_per_op_{m}"] = [r.get("server_cpu_us_per_op") for r in results[m]]
            summary[f"median_ops_per_s_{m}"] = med(summary[f"ops_per_s_{m}"])
            summary[f"median_server_cpu_us_per_op_{m}"] = med(summary[f"server_cpu_us_per_op_{m}"])
        if "off" in modes:
            for m in modes:
                if m == "off":
                    continue
                costs = [round(100 * (1 - on["ops_per_s"] / off["ops_per_s"]), 1)
                         for off, on in zip(results["off"], results[m]) if off["ops_per_s"]]
                summary[f"cost_pct_{m}_per_round"] = costs
                summary[f"median_cost_pct_{m}"] = med(costs)
                cpu = [round(100 * (on["server_cpu_us_per_op"] / off["server_cpu_us_per_op"] - 1), 1)
                       for off, on in zip(results["off"], results[m])
                       if off.get("server_cpu_us_per_op") and on.get("server_cpu_us_per_op")]
                summary[f"cpu_per_op_increase_pct_{m}_per_round"] = cpu
                summary[f"median_cpu_per_op_increase_pct_{m}"] = med(cpu)
        summary["target"] = "outbox cost < 20% (ops/s on >= 0.8 x off)"
        out.append(summary)
        return out


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def create_pg_database(admin_url: str, prefix: str = "propbench") -> tuple[str, str]:
    """A scratch database on ``admin_url``'s server: (name, its URL)."""
    import sqlalchemy as sa

    name = f"{prefix}_{os.getpid()}_{time.time_ns()}"
    eng = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with eng.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        eng.dispose()
    return name, admin_url.rsplit("/", 1)[0] + "/" + name


def drop_pg_database(admin_url: str, name: str) -> None:
    import sqlalchemy as sa

    eng = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with eng.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        log(f"dropped the scratch database {name}")
    except Exception as e:  # noqa: BLE001 - say so, do not hide the run's own result
        log(f"could not drop the scratch database {name}: {type(e).__name__}")
    finally:
        eng.dispose()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=2000, help="bound users (max 999999)")
    ap.add_argument("--backlog", type=int, default=10000, help="changes in the backlog and budget scenarios")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list of " + ",".join(SCENARIOS))
    ap.add_argument("--samples", type=int, default=200, help="latency samples")
    ap.add_argument("--gap", type=float, default=0.1, help="idle seconds before each latency sample")
    ap.add_argument("--sample-timeout", type=float, default=10.0, help="give up on one latency sample after this")
    ap.add_argument("--conns", type=int, default=16, help="LDAP connections for the backlog writer and modify-cost")
    ap.add_argument("--procs", type=int, default=2, help="client processes in modify-cost (loadgen)")
    ap.add_argument("--duration", type=float, default=10, help="measured seconds per modify-cost run")
    ap.add_argument("--warmup", type=float, default=2, help="warm-up seconds per modify-cost run")
    # 600 per 30 s: Graph's 20 writes/s, and a 5% margin (30 writes) that still covers the up to 16
    # PATCHes the stopped tenant holds during the pause and receives at once at the resume (Graph
    # counts a request when it arrives; at its real 3,000 per 150 s the margin is 150).  At 300 per
    # 15 s those 16 alone overrun the 15-write margin: 429s that say nothing about production.
    ap.add_argument("--budget", type=int, default=600, help="the fake's write limit in the budget scenario …")
    ap.add_argument("--window", type=float, default=30, help="… per this many seconds (Graph: 3000 per 150)")
    ap.add_argument("--windows", type=int, default=3, help="report writes/s over the first K windows of the drain")
    ap.add_argument("--throttle-budget", type=int, default=40,
                    help="the fake's write limit in the throttle scenario (the server keeps write_budget's default) …")
    ap.add_argument("--throttle-window", type=float, default=10, help="… per this many seconds")
    ap.add_argument("--server-pacing", choices=("production", "off"), default="production",
                    help="off: run the server with GraphClient pacing disabled (diagnostic, not a product setting)")
    ap.add_argument("--rounds", type=int, default=3, help="modify-cost: rounds of the modes, order rotating")
    ap.add_argument("--modify-modes", default="off,on,paused",
                    help="modify-cost: any of off (connector disabled), on (worker live), paused (tenant stopped)")
    ap.add_argument("--database", default="sqlite",
                    help="sqlite, or a PostgreSQL URL (postgresql+psycopg://...): a scratch database is created there")
    ap.add_argument("--nodes", type=int, default=1, help="server processes on the one database (PostgreSQL)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--bin-dir", help="where twistd and ldapsync are (default: this python's directory)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, database, logs)")
    ap.add_argument("--workdir", help="parent of the temp dir (default: system temp)")
    args = ap.parse_args(argv)

    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown scenario(s): {', '.join(bad)}")
    scenarios = [s for s in SCENARIOS if s in wanted]      # modify-cost restarts the server: always last
    if not (1 <= args.users <= 999999 and 1 <= args.backlog <= 1_000_000 and 1 <= args.samples <= 100_000):
        ap.error("--users 1..999999, --backlog 1..1000000, --samples 1..100000")
    if not (1 <= args.rounds <= 20) or not set(args.modify_modes.split(",")) <= {"off", "on", "paused"}:
        ap.error("--rounds 1..20, --modify-modes a comma list of off,on,paused")
    pg_url = None if args.database == "sqlite" else args.database
    if pg_url is not None and not pg_url.startswith("postgresql"):
        ap.error("--database: sqlite or a postgresql+psycopg:// URL")
    if not (1 <= args.nodes <= 8) or (args.nodes > 1 and pg_url is None):
        ap.error("--nodes 1..8, and more than one needs --database postgresql+psycopg://...")
    if pg_url is not None and "modify-cost" in wanted:
        ap.error("modify-cost restores a SQLite snapshot before each phase: leave it out with --database postgresql")
    if not (1 <= args.conns <= 256 and 0 < args.duration <= 600 and 1 <= args.windows <= 20 and args.budget >= 1
            and args.throttle_budget >= 1 and args.throttle_window > 0):
        ap.error("--conns 1..256, --duration 0..600, --windows 1..20, --budget >= 1")

    work = Path(tempfile.mkdtemp(prefix="propbench-", dir=args.workdir))
    log(f"work dir {work}")
    info = bench_graph.machine_info()
    info["machine"]["background_cpu_pct"] = bg = bench_graph.background_cpu_pct()
    emit(info)
    if bg > 10:
        log(f"WARNING: the machine is already {bg}% busy (100% = one core) before the benchmark; figures will be low")

    tenant = Tenant(work)
    server: Server | None = None
    nodes: list[Server] = []
    scratch_db: str | None = None
    failed = False
    try:
        db_url = None
        if pg_url is not None:
            scratch_db, db_url = create_pg_database(pg_url)
            log(f"PostgreSQL scratch database {scratch_db}")
        t0 = time.monotonic()
        tenant.start()
        log(f"fake tenant pid {tenant.pid} on {tenant.fake.info['base_url']}")
        tenant.admin.configure_throttling(enabled=False)
        seed_tenant(tenant.admin, args.users)
        t_seed = time.monotonic() - t0
        server = Server(work, args.users, tenant.fake.info, args.bin_dir, args.server_pacing, db_url=db_url)
        nodes.append(server)
        write_ldif(server.dir / "users.ldif", args.users)
        server.write_conf(enabled=True)
        server.run_cli("init", timeout=600)
        t_load = server.run_cli("ldif", "load", str(server.dir / "users.ldif"))
        queued = server.outbox()
        t1 = time.monotonic()
        server.start(enabled=True)
        _, left = Bench(args, nodes, tenant).wait_outbox_empty(600, "setup (linking the users)")
        t_link = time.monotonic() - t1
        for k in range(2, args.nodes + 1):
            node = Server(work, args.users, tenant.fake.info, args.bin_dir, args.server_pacing, db_url=db_url,
                          name=f"node{k}")
            nodes.append(node)
            node.start(enabled=True)
        if len(nodes) > 1:
            # every node must have seen the others' heartbeats (every 3 s) and taken its share of the
            # budget before a scenario starts, as in a deployment whose nodes were not all started
            # in the same second as a backlog: otherwise node 1 drains the first seconds at the
            # whole budget's rate
            time.sleep(8)
        linked = tenant.admin.requests(kind="graph", method="GET")
        emit({"scenario": "setup", "users": args.users, "tenant_seed_s": round(t_seed, 2),
              "ldif_load_s": round(t_load, 2), "outbox_rows_after_load": sum(queued.values()),
              "start_and_link_s": round(t_link, 2), "graph_gets": len(linked),
              "graph_writes": len(tenant.admin.requests(kind="graph", method="PATCH"))
              + len(tenant.admin.requests(kind="graph", method="POST")),
              "outbox_left": left, "server_pid": server.pid, "tenant_pid": tenant.pid,
              "pacing": args.server_pacing, "database": "postgresql" if db_url else "sqlite",
              "nodes": len(nodes), "node_pids": [n.pid for n in nodes],
              "note": "users seeded in the fake with the directory's values, so binding links them (soft match) without writes"})
        tenant.admin.clear_requests()
        bench = Bench(args, nodes, tenant)
        bench.probe_pipeline()
        where = {"database": "postgresql" if db_url else "sqlite", "nodes": len(nodes)}
        for sc in scenarios:
            try:
                if sc == "latency":
                    emit({**bench.latency(), **where})
                elif sc == "backlog":
                    emit({**bench.backlog(), **where})
                elif sc == "budget":
                    emit({**bench.budget(), **where})
                elif sc == "throttle":
                    emit({**bench.throttle(), **where})
                elif sc == "modify-cost":
                    for line in bench.modify_cost():
                        emit(line)
            except Exception as e:  # noqa: BLE001 - report and go on
                failed = True
                log(f"{sc} failed: {type(e).__name__}: {e}")
                emit({"scenario": sc, "error": f"{type(e).__name__}: {e}"[:2000]})
                if tenant.stopped:
                    tenant.resume()
    except Exception as e:  # noqa: BLE001
        failed = True
        log(f"setup failed: {type(e).__name__}: {e}")
        emit({"error": f"{type(e).__name__}: {e}"[:2000]})
    finally:
        for node in reversed(nodes):
            node.stop()
            if node._engine is not None:
                node._engine.dispose()
        tenant.stop()
        if scratch_db is not None and pg_url is not None:
            drop_pg_database(pg_url, scratch_db)
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
