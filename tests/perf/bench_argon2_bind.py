#!/usr/bin/env python3
"""Argon2 bind benchmark: LDAP simple binds per second against ``{ARGON2}`` hashes made by
ldapsync itself, and the bare argon2-cffi verify rate of the same hash on the same machine with
as many verifies at once as the server runs.

    python tests/perf/bench_argon2_bind.py [--users 500] [--duration 10] [--rounds 2]
        [--conns 16] [--threads N] [--keep]

ldapsync is loaded with cleartext passwords (``bench_ldap.py --ldapsync-passwords cleartext``:
ldapsync hashes them with its configured argon2id cost), then rounds alternate:

* ``bare``: ``argon2.PasswordHasher().verify(stored_hash, password)`` in ``--threads`` Python
  threads for ``--duration`` seconds (argon2-cffi releases the GIL), the server idle;
* ``server``: ``loadgen.py``'s ``bind`` scenario (``--conns`` connections, each rebinding as a
  random user with the right password).

The server verifies on its hash thread pool (``DirectoryCore(hash_threads=2)``, and the bind
limiter has as many slots), so ``--threads`` defaults to that pool's size, read from the code.
Output: a ``machine`` line, one line per (round, mode) and a ``summary`` line with the medians and
``overhead_pct`` = how much lower the server's binds/s are than the bare verifies/s (target
≤ 10%), and ``cpu_overhead_pct`` = the server's extra CPU per bind over the bare CPU per verify.
See tests/perf/README.md.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ldap  # noqa: E402
import loadgen  # noqa: E402

import argon2  # noqa: E402

HOST = bench_ldap.HOST
log = bench_ldap.log
emit = bench_ldap.emit
HASH_RE = re.compile(rb"\$argon2id\$v=\d+\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+")


def server_hash_threads() -> int:
    """The size of the server's hash thread pool: ``DirectoryCore``'s ``hash_threads`` default
    (the server builds its ``Directory`` without that argument, ldapsync/services.py)."""
    from ldapsync.directory.core import DirectoryCore

    return int(inspect.signature(DirectoryCore.__init__).parameters["hash_threads"].default)


def stored_hash(srv: bench_ldap.Ldapsync) -> str:
    """One argon2id hash the server stored (SQLite files scanned for the encoded form)."""
    found = bench_ldap.find_in_sqlite_files(srv.dir, HASH_RE)
    if found:
        return found.decode()
    raise RuntimeError("no argon2id hash found in the ldapsync database")


def bare_verify(encoded: str, password: bytes, threads: int, duration: float) -> dict:
    """``threads`` threads verifying ``encoded`` for ``duration`` s; verifies/s and CPU per verify."""
    ph = argon2.PasswordHasher()
    if not ph.verify(encoded, password):
        raise RuntimeError("the stored hash does not verify with the bench password")
    counts = [0] * threads
    stop = threading.Event()
    go = threading.Barrier(threads + 1)

    def work(k: int) -> None:
        go.wait()
        n = 0
        for _ in range(10_000_000):       # bounded
            if stop.is_set():
                break
            ph.verify(encoded, password)
            n += 1
        counts[k] = n

    ts = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(threads)]
    for t in ts:
        t.start()
    m0 = loadgen._machine_busy()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    go.wait()
    time.sleep(duration)
    stop.set()
    for t in ts:
        t.join(60)
    wall = time.monotonic() - t0            # includes the verifies finishing after stop
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    m1 = loadgen._machine_busy()
    n = sum(counts)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    total = m1[1] - m0[1]
    return {"verifies": n, "ops_per_s": round(n / wall, 2), "wall_s": round(wall, 2),
            "cpu_pct": round(100 * cpu / wall, 1), "cpu_us_per_op": round(1e6 * cpu / n, 1) if n else None,
            "sys_us_per_op": round(1e6 * (ru1.ru_stime - ru0.ru_stime) / n, 1) if n else None,
            "minflt_per_op": round((ru1.ru_minflt - ru0.ru_minflt) / n, 1) if n else None,
            "ms_per_verify_per_thread": round(1000 * wall * threads / n, 2) if n else None,
            "machine_cpu_pct": round(100.0 * os.cpu_count() * (m1[0] - m0[0]) / total, 1) if total > 0 else None}


def proc_stat(pid: int) -> tuple[int, int, int]:
    """(minor faults, utime ticks, stime ticks) of ``pid`` itself (/proc/PID/stat)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[7]), int(fields[11]), int(fields[12])


def server_binds(srv: bench_ldap.Ldapsync, args, users: int, seed: int) -> dict:
    st0 = proc_stat(srv.pid)
    r = loadgen.run_load(host=HOST, port=srv.port, suffix=bench_ldap.SUFFIX, scenario="bind", users=users,
                         conns=args.conns, duration=args.duration, warmup=args.warmup,
                         admin_dn=bench_ldap.ADMIN_DN, admin_password=bench_ldap.ADMIN_PASSWORD,
                         user_password=bench_ldap.USER_PASSWORD, procs=args.procs, server_pid=srv.pid, seed=seed)
    st1 = proc_stat(srv.pid)
    # faults and the user/system split over warm-up + window (so per bind including the warm-up's binds)
    n_all = r["ops"] + r.get("warmup_ops", 0)
    tck = os.sysconf("SC_CLK_TCK")
    return {"binds": r["ops"], "ops_per_s": r["ops_per_s"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
            "errors": r["errors"], "cpu_pct": r.get("server_cpu_pct"), "cpu_us_per_op": r.get("server_cpu_us_per_op"),
            "sys_share_pct": round(100.0 * (st1[2] - st0[2]) / max(1, (st1[1] - st0[1]) + (st1[2] - st0[2])), 1),
            "minflt_per_op": round((st1[0] - st0[0]) / n_all, 1) if n_all else None,
            "sys_us_per_op_approx": round(1e6 * (st1[2] - st0[2]) / tck / n_all, 1) if n_all else None,
            "client_cpu_pct": r.get("client_cpu_pct"), "machine_cpu_pct": r.get("machine_cpu_pct"),
            **({"error_kinds": r["error_kinds"]} if r.get("error_kinds") else {}),
            **({"client_failures": r["client_failures"]} if r.get("client_failures") else {})}


def background_cpu_pct() -> float:
    b0 = loadgen._machine_busy()
    time.sleep(1.0)
    b1 = loadgen._machine_busy()
    return round(100.0 * (os.cpu_count() or 1) * (b1[0] - b0[0]) / max(1, b1[1] - b0[1]), 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=500, help="users (each hashed by ldapsync at load: ~tens of ms each)")
    ap.add_argument("--duration", type=float, default=10, help="seconds per round and mode")
    ap.add_argument("--warmup", type=float, default=2, help="unmeasured seconds before each server round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of bare + server")
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--procs", type=int, default=1, help="client processes (binds are slow: one is plenty)")
    ap.add_argument("--threads", type=int, default=None,
                    help="concurrent bare verifies (default: the server's hash thread pool size)")
    ap.add_argument("--bin-dir")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--workdir")
    args = ap.parse_args(argv)
    if not 1 <= args.users <= 999999 or args.duration <= 0 or not 1 <= args.rounds <= 20:
        ap.error("--users 1..999999, --duration > 0, --rounds 1..20")
    pool = server_hash_threads()
    threads = args.threads or pool

    info = loadgen.machine_info(argon2_cffi=_version("argon2-cffi"))
    info["machine"]["background_cpu_pct"] = background_cpu_pct()
    info["machine"]["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    emit(info)
    work = Path(tempfile.mkdtemp(prefix="ldapargon-", dir=args.workdir))
    log(f"work dir {work}")
    srv = bench_ldap.Ldapsync(work, args.users, "sqlite", True, args.bin_dir)
    try:
        load_s = srv.load()
        encoded = stored_hash(srv)
        params = encoded.split("$")[3]
        emit({"scenario": "load", "users": args.users, "load_s": round(load_s, 2),
              "hashes_per_s": round(args.users / load_s, 1), "hash": "argon2id " + params})
        srv.start()
        rows: dict[str, list[dict]] = {"bare": [], "server": []}
        for k in range(args.rounds):
            log(f"round {k + 1}: bare verify, {threads} threads, {args.duration}s")
            b = bare_verify(encoded, bench_ldap.USER_PASSWORD.encode(), threads, args.duration)
            emit({"scenario": "argon2-bind", "round": k + 1, "mode": "bare", "threads": threads, **b})
            rows["bare"].append(b)
            log(f"round {k + 1}: server binds, {args.conns} connections, {args.warmup}s + {args.duration}s")
            s = server_binds(srv, args, args.users, args.seed * 100 + k)
            emit({"scenario": "argon2-bind", "round": k + 1, "mode": "server", "conns": args.conns,
                  "server_hash_threads": pool, **s})
            rows["server"].append(s)
        log("bare verify, 1 thread (the cost of one verify)")
        one = bare_verify(encoded, bench_ldap.USER_PASSWORD.encode(), 1, args.duration)
        emit({"scenario": "argon2-bind", "mode": "bare", "threads": 1, **one})

        def med(mode: str, key: str) -> float | None:
            vals = [r[key] for r in rows[mode] if r.get(key) is not None]
            return round(statistics.median(vals), 2) if vals else None

        bare_rate, srv_rate = med("bare", "ops_per_s"), med("server", "ops_per_s")
        bare_cpu, srv_cpu = med("bare", "cpu_us_per_op"), med("server", "cpu_us_per_op")
        emit({
            "scenario": "summary", "hash": "argon2id " + params, "users": args.users, "conns": args.conns,
            "server_hash_threads": pool, "bare_threads": threads, "rounds": args.rounds, "duration_s": args.duration,
            "bare_verifies_per_s": bare_rate, "server_binds_per_s": srv_rate,
            "overhead_pct": round(100.0 * (1 - srv_rate / bare_rate), 1) if bare_rate and srv_rate else None,
            "bare_cpu_us_per_verify": bare_cpu, "server_cpu_us_per_bind": srv_cpu,
            "cpu_overhead_pct": round(100.0 * (srv_cpu / bare_cpu - 1), 1) if bare_cpu and srv_cpu else None,
            "one_thread_verifies_per_s": one["ops_per_s"], "one_thread_ms_per_verify": one["ms_per_verify_per_thread"],
            "errors": sum(r["errors"] for r in rows["server"]), "target_overhead_pct": 10,
            "runs_bare_per_s": [r["ops_per_s"] for r in rows["bare"]],
            "runs_server_per_s": [r["ops_per_s"] for r in rows["server"]],
        })
    except Exception as e:
        log(f"failed: {e}")
        emit({"scenario": "argon2-bind", "error": str(e)[:2000]})
        return 1
    finally:
        srv.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
