#!/usr/bin/env python3
"""LDAP benchmark: ldapsync against OpenLDAP's slapd (back-mdb), same users,
same load, same machine, same run.

    python tests/perf/bench_ldap.py [--users 10000] [--conns 16] [--duration 10]
        [--server ldapsync|slapd|both] [--db sqlite|postgresql+psycopg://...]
        [--scenarios search,bind,modify,mix] [--ldap-processes N] [--keep]

Prints one JSON line per (server, scenario) on stdout, a "load" line per
server (bulk load time), a "machine" line first and, with --server both, one
"ldapsync/slapd" ratio line per scenario.  Progress goes to stderr.
See tests/perf/README.md.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402

SUFFIX = "dc=example,dc=com"
ADMIN_DN = "cn=admin," + SUFFIX
ADMIN_PASSWORD = "bench-admin-secret"
USER_PASSWORD = "bench-user-secret"
HOST = "127.0.0.1"
SCENARIOS = ("search", "bind", "modify", "mix")
SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
SLAPADD = shutil.which("slapadd") or "/usr/sbin/slapadd"
SCHEMA_DIR = "/etc/ldap/schema"
MODULE_DIR = "/usr/lib/ldap"
SSHA_DESC = "{SSHA} (salted SHA-1, 8-byte salt, 1 iteration), pre-hashed by the bench"


def log(msg: str) -> None:
    print("[bench] " + msg, file=sys.stderr, flush=True)


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def ssha(password: str, salt: bytes) -> str:
    d = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(d + salt).decode()


BASE_ENTRIES = f"""dn: {SUFFIX}
objectClass: top
objectClass: dcObject
objectClass: organization
dc: example
o: Example

dn: ou=people,{SUFFIX}
objectClass: top
objectClass: organizationalUnit
ou: people

dn: ou=groups,{SUFFIX}
objectClass: top
objectClass: organizationalUnit
ou: groups

"""


# pwdChangedTime of the loaded users (an export from a directory with a password policy has it):
# ldapsync's first bind of a user with an undated password dates it, a write slapd (no ppolicy
# overlay here) never does; --undated-passwords measures those first binds instead.
DATED = "20261201000000Z"


def user_entry(i: int, password_value: str, dated: bool = False) -> str:
    uid = loadgen.uid_of(i)
    return (
        f"dn: uid={uid},ou=people,{SUFFIX}\n"
        "objectClass: top\n"
        "objectClass: person\n"
        "objectClass: organizationalPerson\n"
        "objectClass: inetOrgPerson\n"
        f"uid: {uid}\n"
        f"cn: Bench User {i:06d}\n"
        f"sn: User{i:06d}\n"
        "givenName: Bench\n"
        f"mail: {uid}@example.com\n"
        f"description: Benchmark user number {i}\n"
        f"userPassword: {password_value}\n"
        + (f"pwdChangedTime: {DATED}\n" if dated else "")
        + "\n"
    )


def write_ldif(path: Path, users: int, *, base: bool, cleartext: bool, seed: int = 42, dated: bool = False) -> None:
    """Users user000001..userNNNNNN; passwords {SSHA} (deterministic salts) or
    cleartext (the server hashes them)."""
    rnd = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        if base:
            f.write(BASE_ENTRIES)
        chunk = []
        for i in range(1, users + 1):
            pw = USER_PASSWORD if cleartext else ssha(USER_PASSWORD, rnd.randbytes(8))
            chunk.append(user_entry(i, pw, dated))
            if len(chunk) >= 1000:
                f.write("".join(chunk))
                chunk.clear()
        f.write("".join(chunk))


# --------------------------------------------------------------------------
# Process helpers
# --------------------------------------------------------------------------


def find_in_sqlite_files(directory: Path, rx: "re.Pattern[bytes]") -> bytes | None:
    """The first match of ``rx`` in ldapsync.db or its WAL in ``directory`` (read in bounded chunks)."""
    for name in ("ldapsync.db", "ldapsync.db-wal"):
        p = directory / name
        if not p.exists():
            continue
        with open(p, "rb") as f:
            for _ in range(1 << 16):  # bounded: 64 Ki chunks of 1 MiB
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                m = rx.search(chunk)
                if m:
                    return m.group(0)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen | None, timeout: float, uid: str) -> None:
    """Poll until an admin bind + search for a known user works (bounded)."""
    deadline = time.monotonic() + timeout
    last = None
    for _ in range(int(timeout / 0.2) + 1):
        if proc is not None and proc.poll() is not None:
            rc = proc.returncode
            how = f"signal {signal.Signals(-rc).name}, not sent by the bench" if rc < 0 else f"status {rc}"
            raise RuntimeError(f"server exited ({how}) while starting; last probe: {last}")
        try:
            last = loadgen.probe(HOST, port, SUFFIX, uid, ADMIN_DN, ADMIN_PASSWORD, timeout=5)
            if not last:
                return
        except (OSError, RuntimeError) as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    raise RuntimeError(f"server on port {port} not ready after {timeout}s: {last}")


def stop_pid(proc: subprocess.Popen, name: str, timeout: float = 15) -> None:
    if proc.poll() is not None:
        return
    log(f"stopping {name} (pid {proc.pid})")
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log(f"{name} did not stop in {timeout}s, killing pid {proc.pid}")
        proc.kill()
        proc.wait(10)


def run_checked(cmd: list[str], *, cwd: Path, log_path: Path, timeout: float) -> float:
    log("running: " + " ".join(cmd))
    t0 = time.monotonic()
    with open(log_path, "ab") as lf:
        r = subprocess.run(cmd, cwd=cwd, stdout=lf, stderr=subprocess.STDOUT, timeout=timeout)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{cmd[0]} exited with {r.returncode}; log tail:\n{tail}")
    return dt


# --------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------


class Slapd:
    name = "slapd"
    db = "mdb"

    def __init__(self, work: Path, users: int):
        self.dir = work / "slapd"
        self.dir.mkdir()
        (self.dir / "db").mkdir()
        self.users = users
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.conf = self.dir / "slapd.conf"
        self.ldif = self.dir / "users.ldif"
        self.log = self.dir / "slapd.log"
        self.hash = SSHA_DESC

    def write_conf(self) -> None:
        rootpw = ssha(ADMIN_PASSWORD, os.urandom(8))
        # maxsize: ~2.5 KiB per user with indexes, at least 1 GiB
        maxsize = max(1 << 30, self.users * 16384)
        self.conf.write_text(
            f"""# generated by tests/perf/bench_ldap.py
include {SCHEMA_DIR}/core.schema
include {SCHEMA_DIR}/cosine.schema
include {SCHEMA_DIR}/inetorgperson.schema
include {SCHEMA_DIR}/nis.schema
pidfile {self.dir}/slapd.pid
argsfile {self.dir}/slapd.args
modulepath {MODULE_DIR}
moduleload back_mdb
loglevel 0
tool-threads 2

database mdb
maxsize {maxsize}
suffix "{SUFFIX}"
rootdn "{ADMIN_DN}"
rootpw {rootpw}
directory {self.dir}/db
index objectClass eq
index uid eq
index cn,sn,givenName,mail eq,sub
# same access model as ldapsync: passwords are for binding only,
# authenticated users read, anonymous only binds
access to attrs=userPassword by self write by anonymous auth by * none
access to * by users read by * none
"""
        )

    def load(self) -> float:
        write_ldif(self.ldif, self.users, base=True, cleartext=False)
        self.write_conf()
        return run_checked(
            [SLAPADD, "-q", "-f", str(self.conf), "-l", str(self.ldif)],
            cwd=self.dir,
            log_path=self.log,
            timeout=3600,
        )

    def start(self) -> None:
        cmd = [SLAPD, "-d", "0", "-f", str(self.conf), "-h", f"ldap://{HOST}:{self.port}/"]
        log("starting: " + " ".join(cmd))
        lf = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.dir, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
        lf.close()
        wait_ready(self.port, self.proc, 30, loadgen.uid_of(1))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        if self.proc:
            stop_pid(self.proc, "slapd")

    @staticmethod
    def version() -> str:
        try:
            out = subprocess.run([SLAPD, "-VV"], capture_output=True, text=True, timeout=10)
            m = re.search(r"slapd ([\w.+~-]+)", out.stdout + out.stderr)
            return m.group(1) if m else "?"
        except Exception:
            return "?"


class Ldapsync:
    name = "ldapsync"

    def __init__(self, work: Path, users: int, database: str, cleartext: bool, bin_dir: str | None = None,
                 durability: str = "full", processes: int = 1):
        self.dir = work / "ldapsync"
        self.durability = durability
        self.processes = processes
        self.dir.mkdir()
        self.users = users
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.conf = self.dir / "ldapsync.toml"
        self.ldif = self.dir / "users.ldif"
        self.log = self.dir / "ldapsync.log"
        self.cleartext = cleartext
        self.dated = True                 # pwdChangedTime loaded (see DATED); main() may say otherwise
        if database == "sqlite":
            self.database = "sqlite:///" + str(self.dir / "ldapsync.db")
            self.db = "sqlite"
        else:
            self.database = database
            self.db = "postgresql" if database.startswith("postgres") else database.split(":", 1)[0]
        bindir = Path(bin_dir) if bin_dir else Path(sys.executable).parent
        self.twistd = str(bindir / "twistd") if (bindir / "twistd").exists() else (shutil.which("twistd") or "twistd")
        self.cli = str(bindir / "ldapsync") if (bindir / "ldapsync").exists() else (shutil.which("ldapsync") or "ldapsync")
        self.hash = SSHA_DESC + " (same values as slapd)" if not cleartext else "argon2id (cleartext given, server default)"

    def write_conf(self) -> None:
        pw = self.dir / "admin-password"
        pw.write_text(ADMIN_PASSWORD + "\n")
        pw.chmod(0o600)
        self.conf.write_text(
            f"""# generated by tests/perf/bench_ldap.py
[directory]
suffix = "{SUFFIX}"
database = "{self.database}"
durability = "{self.durability}"
[ldap]
listen = ["tcp:{self.port}:interface={HOST}"]
processes = {self.processes}               # LDAP processes (--ldap-processes; the server's default is one per CPU)
[admin]
password_file = "{pw}"
[selfservice]
listen = ""                       # no pages: benchmarks must not take port 8080
"""
        )

    def load(self) -> float:
        # `ldapsync init` creates the suffix, ou=people, ou=groups, ... and
        # cn=admin, so the LDIF holds the users only.
        write_ldif(self.ldif, self.users, base=False, cleartext=self.cleartext, dated=self.dated)
        self.write_conf()
        base = [self.cli, "--config", str(self.conf)]
        t_init = run_checked(base + ["init"], cwd=self.dir, log_path=self.log, timeout=600)
        log(f"ldapsync init took {t_init:.2f}s")
        t = run_checked(base + ["ldif", "load", str(self.ldif)], cwd=self.dir, log_path=self.log, timeout=4 * 3600)
        if self.cleartext:
            params = self._argon_params()
            if params:
                self.hash = f"argon2id {params} (cleartext given, hashed by ldapsync)"
        return t

    def _argon_params(self) -> str | None:
        """Read the argon2 parameters from a stored hash (SQLite only)."""
        if self.db != "sqlite":
            return None
        found = find_in_sqlite_files(self.dir, re.compile(rb"\$argon2id?\$v=\d+\$m=\d+,t=\d+,p=\d+"))
        return found.decode().lstrip("$").replace("argon2id$", "") if found else None

    def start(self) -> None:
        cmd = [self.twistd, "-n", "--pidfile=", "ldapsync", "--config", str(self.conf)]
        log("starting: " + " ".join(cmd))
        lf = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.dir, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
        lf.close()
        wait_ready(self.port, self.proc, 60, loadgen.uid_of(1))
        # [ldap] processes > 1: the others answer once they say so (connections the kernel hands
        # to one still starting would wait for it)
        deadline = time.monotonic() + 60
        while self.log.read_text(errors="replace").count(") answering") < self.processes - 1:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"ldapsync's {self.processes} LDAP processes did not all start; see {self.log}")
            time.sleep(0.1)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        if self.proc:
            stop_pid(self.proc, "ldapsync")


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def machine_info(slapd_version: str) -> dict:
    return loadgen.machine_info(slapd=slapd_version)


def bench_server(srv, args, scenarios, results: dict) -> None:
    try:
        load_s = srv.load()
        emit(
            {
                "server": srv.name,
                "scenario": "load",
                "users": args.users,
                "entries": args.users + (3 if srv.name == "slapd" else 0),
                "load_s": round(load_s, 2),
                "entries_per_s": round(args.users / load_s, 1) if load_s else None,  # users/s
                "tool": "slapadd -q" if srv.name == "slapd" else "ldapsync ldif load",
                "db": srv.db,
            }
        )
        srv.start()
        for sc in scenarios:
            runs = []
            for k in range(args.repeat):
                log(
                    f"{srv.name}: {sc} with {args.conns} connections, {args.warmup}s warm-up + {args.duration}s"
                    + (f" (run {k + 1}/{args.repeat})" if args.repeat > 1 else "")
                )
                runs.append(run_one(srv, sc, args, k))
            # report the run with the median throughput, and all throughputs
            runs.sort(key=lambda r: r["ops_per_s"])
            r = runs[(len(runs) - 1) // 2]
            line = {
                "server": srv.name,
                "scenario": sc,
                "users": args.users,
                "conns": args.conns,
                "duration_s": args.duration,
                **{k: r[k] for k in ("ops", "ops_per_s", "p50_ms", "p99_ms", "p999_ms", "max_ms", "errors")},
            }
            if sc == "bind":
                line["hash"] = srv.hash
                if srv.name == "ldapsync":
                    line["pwdChangedTime_loaded"] = srv.dated
            line["db"] = srv.db
            if srv.name == "ldapsync":
                # server_cpu_* count every process of the server: the LDAP processes (children of
                # the twistd process, like the Microsoft 365 worker: server_children_cpu_pct) too
                line["ldap_processes"] = srv.processes
            if len(runs) > 1:
                line["runs_ops_per_s"] = [x["ops_per_s"] for x in runs]
                line["errors"] = sum(x["errors"] for x in runs)
            line.update({k: v for k, v in r.items() if k not in line})
            emit(line)
            results[(srv.name, sc)] = line
    finally:
        srv.stop()


def run_one(srv, sc: str, args, run: int = 0) -> dict:
    return loadgen.run_load(
        host=HOST,
        port=srv.port,
        suffix=SUFFIX,
        scenario=sc,
        users=args.users,
        conns=args.conns,
        duration=args.duration,
        warmup=args.warmup,
        admin_dn=ADMIN_DN,
        admin_password=ADMIN_PASSWORD,
        user_password=USER_PASSWORD,
        procs=args.procs,
        server_pid=srv.pid,
        seed=args.seed * 100 + run,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=10000, help="number of generated users (max 999999)")
    ap.add_argument("--conns", type=int, default=16, help="concurrent client connections")
    ap.add_argument("--duration", type=float, default=10, help="measured seconds per scenario")
    ap.add_argument("--warmup", type=float, default=2, help="warm-up seconds per scenario (not measured)")
    ap.add_argument("--server", choices=("ldapsync", "slapd", "both"), default="both")
    ap.add_argument(
        "--db",
        default="sqlite",
        help="ldapsync storage: 'sqlite' (a fresh file in the temp dir) or an SQLAlchemy URL "
        "such as postgresql+psycopg://user@host/db (must be an empty database)",
    )
    ap.add_argument("--scenarios", default="search,bind,modify,mix", help="comma list of " + ",".join(SCENARIOS))
    ap.add_argument(
        "--ldapsync-passwords",
        choices=("ssha", "cleartext"),
        default="ssha",
        help="ssha: load ldapsync with the same {SSHA} values as slapd (default, comparable binds, fast load); "
        "cleartext: let ldapsync hash them (argon2id by default; slow load for many users)",
    )
    ap.add_argument(
        "--bin-dir",
        help="directory holding the twistd and ldapsync scripts (default: the directory of this python, i.e. its venv)",
    )
    ap.add_argument("--procs", type=int, default=2, help="client processes (each runs one epoll loop)")
    ap.add_argument(
        "--repeat", type=int, default=1, help="runs per scenario; the median run (by ops/s) is reported, with all throughputs"
    )
    ap.add_argument("--durability", choices=("full", "normal"), default="full",
                    help="ldapsync's [directory] durability (full: fsync at every COMMIT; normal: at checkpoints)")
    ap.add_argument("--ldap-processes", type=int, default=1,
                    help="ldapsync's [ldap] processes (default 1, so figures stay comparable with earlier runs)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--undated-passwords", action="store_true",
                    help="load ldapsync's users without pwdChangedTime: each user's first bind then dates it (a write)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (LDIF, configs, databases, logs)")
    ap.add_argument("--workdir", help="parent of the temp dir (default: system temp)")
    args = ap.parse_args(argv)

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown scenario(s): {', '.join(bad)}")
    if not 1 <= args.users <= 999999:
        ap.error("--users must be between 1 and 999999")
    if args.conns < 1 or args.duration <= 0 or not 1 <= args.repeat <= 20:
        ap.error("--conns and --duration must be positive, --repeat between 1 and 20")
    if not 1 <= args.ldap_processes <= 256:
        ap.error("--ldap-processes must be between 1 and 256")

    work = Path(tempfile.mkdtemp(prefix="ldapbench-", dir=args.workdir))
    log(f"work dir {work}")
    servers = []
    if args.server in ("slapd", "both"):
        servers.append(Slapd(work, args.users))
    if args.server in ("ldapsync", "both"):
        servers.append(Ldapsync(work, args.users, args.db, args.ldapsync_passwords == "cleartext", args.bin_dir,
                                args.durability, args.ldap_processes))
        servers[-1].dated = not args.undated_passwords
    slapd_version = Slapd.version() if shutil.which("slapd") or os.path.exists(SLAPD) else "not installed"
    info = machine_info(slapd_version)
    # CPU already busy before we start (other processes on this machine)
    b0 = loadgen._machine_busy()
    time.sleep(1.0)
    b1 = loadgen._machine_busy()
    bg = round(100.0 * (os.cpu_count() or 1) * (b1[0] - b0[0]) / max(1, b1[1] - b0[1]), 1)
    info["machine"]["background_cpu_pct"] = bg
    emit(info)
    if bg > 10:
        log(f"WARNING: the machine is already {bg}% busy (100% = one core) before the benchmark; figures will be low")

    results: dict = {}
    failed = False
    try:
        for srv in servers:
            try:
                bench_server(srv, args, scenarios, results)
            except Exception as e:
                failed = True
                log(f"{srv.name} failed: {e}")
                emit({"server": srv.name, "error": str(e)[:2000]})
        if args.server == "both":
            for sc in scenarios:
                a, b = results.get(("ldapsync", sc)), results.get(("slapd", sc))
                if not (a and b):
                    continue

                def ratio(x, y):
                    return round(x / y, 3) if x is not None and y else None

                emit(
                    {
                        "server": "ldapsync/slapd",
                        "scenario": sc,
                        "users": args.users,
                        "conns": args.conns,
                        "ops_per_s_ratio": ratio(a["ops_per_s"], b["ops_per_s"]),
                        "p50_ratio": ratio(a["p50_ms"], b["p50_ms"]),
                        "p99_ratio": ratio(a["p99_ms"], b["p99_ms"]),
                        "server_cpu_per_op_ratio": ratio(a.get("server_cpu_us_per_op"), b.get("server_cpu_us_per_op")),
                        "db": a["db"],
                    }
                )
    finally:
        for srv in servers:
            srv.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
