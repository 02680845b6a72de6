#!/usr/bin/env python3
"""Memory benchmark: the ldapsync server's RSS after loading N users, and over a long
mixed (90% search / 10% modify) run.

    python tests/perf/bench_memory.py [--users 10000,100000] [--duration 120]
        [--interval 5] [--conns 16] [--no-touch] [--tracemalloc] [--keep]

For each N (a fresh SQLite database each): ``ldapsync ldif load`` of N users (wall time and the
loader's peak RSS from ``wait4``), the server started (RSS idle), every user read once by a
search (RSS with the directory touched), then ``--duration`` seconds of the ``mix`` scenario of
``loadgen.py`` with the RSS of the server process and its children sampled every
``--interval`` seconds.  One JSON line per N with the samples, start/end/max RSS and the slope
(least squares, MiB per minute) over the second half of the run; "flat" = no steady growth.

Uses ``bench_ldap.py``'s ``Ldapsync`` server class and ``write_ldif`` (read-only) and
``loadgen.run_load``.  See tests/perf/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ldap  # noqa: E402
import loadgen  # noqa: E402

HOST = bench_ldap.HOST
SUFFIX = bench_ldap.SUFFIX
log = bench_ldap.log
emit = bench_ldap.emit


# --------------------------------------------------------------------------
# Memory of a process tree (Linux /proc)
# --------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int | None:
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = loadgen.child_pids(pid)
    for _ in range(1000):           # bounded walk
        if not todo:
            break
        p = todo.pop()
        out.append(p)
        todo += loadgen.child_pids(p)
    return out


def rss_mib(pid: int) -> dict:
    """RSS of ``pid`` and of all its descendants (MiB); ``hwm``: the process's own peak."""
    own = _status_kib(pid, "VmRSS") or 0
    kids = sum(_status_kib(c, "VmRSS") or 0 for c in descendants(pid))
    return {
        "rss_mib": round((own + kids) / 1024, 1),
        "ldap_rss_mib": round(own / 1024, 1),
        "children_rss_mib": round(kids / 1024, 1),
        "ldap_hwm_mib": round((_status_kib(pid, "VmHWM") or 0) / 1024, 1),
    }


def slope_mib_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) points, in MiB per minute."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx == 0:
        return None
    sxy = sum((t - mx) * (v - my) for t, v in points)
    return round(60.0 * sxy / sxx, 3)


# --------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------


def run_wait4(cmd: list[str], *, cwd: Path, log_path: Path, timeout: float) -> tuple[float, float]:
    """Run ``cmd`` to completion; (wall seconds, peak RSS MiB of that process from wait4)."""
    log("running: " + " ".join(cmd))
    t0 = time.monotonic()
    with open(log_path, "ab") as lf:
        p = subprocess.Popen(cmd, cwd=cwd, stdout=lf, stderr=subprocess.STDOUT)
        status = ru = None
        deadline = t0 + timeout
        for _ in range(int(timeout * 10) + 1):     # bounded poll
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                p.kill()
                _, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.1)
        p.returncode = os.waitstatus_to_exitcode(status) if status is not None else -1
    dt = time.monotonic() - t0
    if p.returncode != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{cmd[0]} exited with {p.returncode}; log tail:\n{tail}")
    return dt, round(ru.ru_maxrss / 1024, 1)


def load(srv: bench_ldap.Ldapsync, users: int) -> dict:
    """What ``Ldapsync.load`` does ({SSHA} passwords), with the loader's peak RSS."""
    bench_ldap.write_ldif(srv.ldif, users, base=False, cleartext=False)
    srv.write_conf()
    base = [srv.cli, "--config", str(srv.conf)]
    t_init, _ = run_wait4(base + ["init"], cwd=srv.dir, log_path=srv.log, timeout=600)
    t_load, peak = run_wait4(base + ["ldif", "load", str(srv.ldif)], cwd=srv.dir, log_path=srv.log, timeout=4 * 3600)
    db = srv.dir / "ldapsync.db"
    size = sum(p.stat().st_size for p in srv.dir.glob("ldapsync.db*")) if db.exists() else None
    return {"init_s": round(t_init, 2), "load_s": round(t_load, 2), "users_per_s": round(users / t_load, 1),
            "loader_peak_rss_mib": peak, "db_mib": round(size / 2**20, 1) if size else None}


def touch_all(port: int, users: int, window: int = 64, timeout: float = 30.0) -> float:
    """Search every user once (pipelined, ``window`` requests in flight on one connection);
    fails unless each search returns exactly one entry.  Returns the wall seconds."""
    t0 = time.monotonic()
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        got = loadgen._blocking_roundtrip(s, loadgen.frame(1, loadgen.bind_op(bench_ldap.ADMIN_DN,
                                                                              bench_ldap.ADMIN_PASSWORD)), timeout)
        if got[-1] != (loadgen.T_BIND_RESP, 0):
            raise RuntimeError("admin bind failed: %r" % (got[-1],))
        tpl = loadgen.Templates(SUFFIX, bench_ldap.USER_PASSWORD)
        buf = bytearray()
        nxt, done, entries, msgid = 1, 0, 0, 1
        for _ in range(users * 4 + 1000):          # bounded: a few reads per search at most
            if done >= users:
                break
            out = []
            while nxt <= users and nxt - done <= window:
                msgid += 1
                out.append(loadgen.frame(msgid, tpl.search_req(nxt)))
                nxt += 1
            if out:
                s.sendall(b"".join(out))
            data = s.recv(1 << 20)
            if not data:
                raise ConnectionError("server closed the connection during the touch pass")
            buf += data
            for tag, rc in loadgen.parse_messages(buf):
                if tag == loadgen.T_ENTRY:
                    entries += 1
                elif tag == loadgen.T_DONE:
                    if rc != 0:
                        raise RuntimeError("search failed with resultCode %s" % rc)
                    done += 1
        if done != users or entries != users:
            raise RuntimeError(f"touch pass: {done} searches done, {entries} entries for {users} users")
        s.sendall(loadgen.frame(msgid + 1, loadgen.UNBIND))
    return time.monotonic() - t0


class Sampler(threading.Thread):
    """Every ``interval`` s: RSS of the server tree, its CPU and the machine's (bounded by ``stop``)."""

    def __init__(self, pid: int, interval: float, max_samples: int):
        super().__init__(daemon=True)
        self.pid, self.interval, self.max_samples = pid, interval, max_samples
        self.samples: list[dict] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        cpu0 = loadgen._proc_cpu_s(self.pid) or 0.0
        m0 = loadgen._machine_busy()
        for k in range(self.max_samples):
            t = time.monotonic()
            cpu = loadgen._proc_cpu_s(self.pid) or 0.0
            m = loadgen._machine_busy()
            dt = max(1e-6, t - (self.samples[-1]["_t"] if self.samples else t0))
            total = m[1] - m0[1]
            self.samples.append({"_t": t, "t_s": round(t - t0, 1), **rss_mib(self.pid),
                                 "server_cpu_pct": round(100.0 * (cpu - cpu0) / dt, 1) if k else None,
                                 "machine_cpu_pct": round(100.0 * os.cpu_count() * (m[0] - m0[0]) / total, 1)
                                 if k and total > 0 else None})
            cpu0, m0 = cpu, m
            if self.stop_event.wait(self.interval):
                break


PROBE = Path(__file__).resolve().parent / "tracemalloc_probe"


class Snapshots:
    """``--tracemalloc``: a snapshot of the server's Python allocations at the end of the warm-up
    and one at the end of the run (SIGUSR2, ``tracemalloc_probe/sitecustomize.py``); what grew
    between them, by the file that allocated it."""

    def __init__(self, pid: int, folder: Path, warmup: float, duration: float):
        self.pid, self.folder = pid, folder
        self.timers = [threading.Timer(warmup + 1.0, self._take), threading.Timer(warmup + duration - 1.0, self._take)]
        for t in self.timers:
            t.daemon = True
            t.start()

    def _take(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGUSR2)

    def growth(self, top: int = 8) -> dict:
        for t in self.timers:
            t.join(5)
        deadline = time.monotonic() + 60
        while len(list(self.folder.glob("snap.*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2.0)                   # the second dump may still be being written
        paths = sorted(self.folder.glob("snap.*"), key=lambda p: int(p.suffix[1:]))
        if len(paths) < 2:
            return {"error": f"{len(paths)} snapshot(s) written"}
        first, last = (tracemalloc.Snapshot.load(str(p)) for p in (paths[0], paths[-1]))
        stats = last.compare_to(first, "filename")
        return {
            "traced_start_mib": round(sum(s.size for s in first.statistics("filename")) / 2**20, 1),
            "traced_end_mib": round(sum(s.size for s in last.statistics("filename")) / 2**20, 1),
            "growth_by_file": [{"file": s.traceback[0].filename, "kib": round(s.size_diff / 1024, 1),
                                "blocks": s.count_diff} for s in stats[:top]],
        }


def background_cpu_pct() -> float:
    b0 = loadgen._machine_busy()
    time.sleep(1.0)
    b1 = loadgen._machine_busy()
    return round(100.0 * (os.cpu_count() or 1) * (b1[0] - b0[0]) / max(1, b1[1] - b0[1]), 1)


def bench_size(work: Path, users: int, args) -> None:
    sub = work / f"users-{users}"
    sub.mkdir()
    srv = bench_ldap.Ldapsync(sub, users, args.db, False, args.bin_dir, args.durability)
    try:
        ld = load(srv, users)
        emit({"scenario": "load", "users": users, "db": srv.db, "tool": "ldapsync ldif load", **ld})
        traces = None
        if args.tracemalloc:
            traces = sub / "tracemalloc"
            traces.mkdir()
            os.environ["LDAPSYNC_BENCH_TRACEMALLOC_DIR"] = str(traces)
            os.environ["PYTHONPATH"] = os.pathsep.join(
                [str(PROBE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        try:
            srv.start()
        finally:
            os.environ.pop("LDAPSYNC_BENCH_TRACEMALLOC_DIR", None)
        time.sleep(1.0)
        line: dict = {"scenario": "memory", "users": users, "db": srv.db, "background_cpu_pct": background_cpu_pct(),
                      "load_avg_1m": round(os.getloadavg()[0], 2)}
        line["after_start"] = rss_mib(srv.pid)
        if args.touch:
            line["touch_s"] = round(touch_all(srv.port, users), 2)
            line["after_touch"] = rss_mib(srv.pid)
        sampler = Sampler(srv.pid, args.interval, int((args.duration + args.warmup + 120) / args.interval) + 10)
        sampler.start()
        log(f"ldapsync {users} users: mix with {args.conns} connections, {args.warmup}s warm-up + {args.duration}s, "
            f"RSS every {args.interval}s")
        snaps = Snapshots(srv.pid, traces, args.warmup, args.duration) if traces else None
        r = loadgen.run_load(host=HOST, port=srv.port, suffix=SUFFIX, scenario="mix", users=users, conns=args.conns,
                             duration=args.duration, warmup=args.warmup, admin_dn=bench_ldap.ADMIN_DN,
                             admin_password=bench_ldap.ADMIN_PASSWORD, user_password=bench_ldap.USER_PASSWORD,
                             procs=args.procs, server_pid=srv.pid, seed=args.seed)
        sampler.stop_event.set()
        sampler.join(args.interval + 5)
        if snaps is not None:
            line["tracemalloc"] = snaps.growth()
        line["after_run"] = rss_mib(srv.pid)
        samples = sampler.samples
        # the measured window: samples from the end of the warm-up on
        t_w = samples[0]["_t"] + args.warmup + 0.2 if samples else 0
        run = [s for s in samples if s["_t"] >= t_w] or samples
        for s in samples:
            s.pop("_t")
        rss = [s["rss_mib"] for s in run]
        half = run[len(run) // 2:]
        line.update({
            "duration_s": args.duration, "interval_s": args.interval, "conns": args.conns,
            "ops_per_s": r["ops_per_s"], "ops": r["ops"], "errors": r["errors"], "p50_ms": r["p50_ms"],
            "p99_ms": r["p99_ms"], "server_cpu_pct": r.get("server_cpu_pct"),
            "server_cpu_us_per_op": r.get("server_cpu_us_per_op"), "machine_cpu_pct": r.get("machine_cpu_pct"),
            "client_cpu_pct": r.get("client_cpu_pct"),
            "rss_start_mib": rss[0] if rss else None, "rss_end_mib": rss[-1] if rss else None,
            "rss_max_mib": max(rss) if rss else None,
            "slope_mib_per_min_second_half": slope_mib_per_min([(s["t_s"], s["rss_mib"]) for s in half]),
            "slope_mib_per_min_all": slope_mib_per_min([(s["t_s"], s["rss_mib"]) for s in run]),
            "samples": samples,
        })
        if r.get("error_kinds"):
            line["error_kinds"] = r["error_kinds"]
        if r.get("client_failures"):
            line["client_failures"] = r["client_failures"]
        emit(line)
    finally:
        srv.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", default="10000,100000", help="comma list of directory sizes (each a fresh database)")
    ap.add_argument("--duration", type=float, default=120, help="measured seconds of the mix run (600 = the issue's 10 min)")
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--interval", type=float, default=5, help="seconds between RSS samples")
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--db", default="sqlite", help="sqlite or an empty database's SQLAlchemy URL (one size per run then)")
    ap.add_argument("--durability", choices=("full", "normal"), default="full")
    ap.add_argument("--no-touch", dest="touch", action="store_false", help="skip reading every user once before the run")
    ap.add_argument("--bin-dir")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tracemalloc", action="store_true",
                    help="trace the server's Python allocations (slower) and report what grew during the run, by file")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--workdir")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.users.split(",") if x.strip()]
    if not sizes or not all(1 <= n <= 999999 for n in sizes):
        ap.error("--users: sizes between 1 and 999999")
    if args.duration <= 0 or args.interval <= 0 or args.duration > 24 * 3600:
        ap.error("--duration and --interval must be positive (duration at most a day)")
    if args.db != "sqlite" and len(sizes) > 1:
        ap.error("with a database URL give one size per run (the database must be empty)")

    info = loadgen.machine_info()
    info["machine"]["background_cpu_pct"] = background_cpu_pct()
    info["machine"]["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    emit(info)
    work = Path(tempfile.mkdtemp(prefix="ldapmem-", dir=args.workdir))
    log(f"work dir {work}")
    failed = False
    try:
        for n in sizes:
            try:
                bench_size(work, n, args)
            except Exception as e:
                failed = True
                log(f"{n} users failed: {e}")
                emit({"scenario": "memory", "users": n, "error": str(e)[:2000]})
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
