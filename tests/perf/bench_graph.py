#!/usr/bin/env python3
"""Graph client benchmark: ldapsync's GraphClient (treq) + MSAL against the fake
Microsoft 365 tenant, over HTTPS on loopback.

    python tests/perf/bench_graph.py [--duration 10] [--concurrency 16]
        [--scenarios get,patch,batch,paced] [--users 1000]
        [--budget 300 --window 15 --windows 3]

The fake tenant runs in its own process (``python -m ldapsync.testing.tenant``),
so this process holds only the client: real MSAL (client credentials with a
secret) and the real ``GraphClient``.  Prints a "machine" line, a "setup" line
and one JSON line per scenario on stdout; progress goes to stderr.
It is a benchmark, not a test: it never fails because of slow figures, only
when the tenant cannot be set up.  See tests/perf/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen

SCENARIOS = ("get", "patch", "batch", "paced", "paced-on", "paced-off")
DOMAIN = "contoso.com"          # a verified domain of the demo tenant
MAX_OPS_PER_WORKER = 1_000_000  # hard bound on every worker loop
GRACE_S = 5.0                   # after the window: let in-flight ops finish, then cancel them


def log(msg: str) -> None:
    print("[bench] " + msg, file=sys.stderr, flush=True)


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def cpu_self() -> float:
    """CPU seconds (user + system) of this process, all threads (MSAL's pool included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def ms(x: float) -> float:
    return round(x * 1000.0, 3)


# --------------------------------------------------------------------------
# Setup (blocking, before the reactor runs)
# --------------------------------------------------------------------------


def machine_info() -> dict:
    import msal
    import treq
    import twisted
    from twisted.internet import reactor

    return loadgen.machine_info(twisted=twisted.__version__, treq=treq.__version__, msal=msal.__version__,
                                reactor=type(reactor).__name__)


def background_cpu_pct() -> float:
    b0 = loadgen._machine_busy()
    time.sleep(1.0)
    b1 = loadgen._machine_busy()
    return round(100.0 * (os.cpu_count() or 1) * (b1[0] - b0[0]) / max(1, b1[1] - b0[1]), 1)


def seed_users(admin: Any, n: int) -> list[str]:
    """``n`` users bench000001@contoso.com… through the admin API (not Graph, not throttled)."""
    ids = []
    for i in range(1, n + 1):
        u = admin.add_user(upn=f"bench{i:06d}@{DOMAIN}", display_name=f"Bench User {i:06d}",
                           givenName="Bench", surname=f"User{i:06d}", jobTitle="Benchmark",
                           usageLocation="US")
        ids.append(u["id"])
    return ids


# --------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------


@dataclass
class Run:
    """What the workers of one scenario saw (client side)."""

    t_measure: float                      # wall clock (time.time) start of the measured window
    t_stop: float                         # wall clock end of the measured window
    lat: list[float] = field(default_factory=list)     # per op, measured ops only (s)
    done_at: list[float] = field(default_factory=list)  # wall completion time of successful measured ops
    ok: int = 0
    items_ok: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    warmup_ops: int = 0
    late_ops: int = 0                     # finished after the window (not counted)
    cancelled: int = 0

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


def make_client(provider: Any, info: dict, reactor: Any, *, pacing: Any, concurrency: int) -> Any:
    from ldapsync.graph.client import GraphClient

    return GraphClient(provider, info["graph_url"], reactor=reactor, ca_bundle=info["ca_file"],
                       timeout=30.0, pacing=pacing, max_connections=concurrency,
                       user_agent="ldapsync-bench")


async def run_load(reactor: Any, client: Any, op, *, concurrency: int, warmup: float, duration: float,
                   count_from_start: bool = False) -> Run:
    """``concurrency`` workers call ``await op(rnd)`` in a loop (one outstanding op each).

    ``op`` returns the number of successful items (1 for a plain request,
    up to 20 for a $batch).  Ops that start and end inside the measured window
    count; with ``count_from_start`` (paced scenarios) the window starts with
    the first op and there is no warm-up.
    """
    from twisted.internet import defer, task

    from ldapsync.graph.errors import GraphError

    t0 = time.time()
    run = Run(t_measure=t0 + (0.0 if count_from_start else warmup),
              t_stop=t0 + (0.0 if count_from_start else warmup) + duration)
    stopping = [False]

    async def worker(k: int) -> None:
        rnd = random.Random(1000 + k)
        for _ in range(MAX_OPS_PER_WORKER):
            start_wall = time.time()
            if stopping[0] or start_wall >= run.t_stop:
                return
            start = time.perf_counter()
            try:
                items = await op(rnd)
                failed = None
            except defer.CancelledError:
                run.cancelled += 1
                raise
            except GraphError as e:
                items, failed = 0, f"{e.status or 'x'}_{e.code}"
            except Exception as e:  # noqa: BLE001 - a benchmark reports, it does not crash
                items, failed = 0, type(e).__name__
            end_wall = time.time()
            if start_wall < run.t_measure:
                run.warmup_ops += 1
                continue
            if end_wall > run.t_stop:
                run.late_ops += 1
                continue
            if failed:
                run.error(failed)
                continue
            run.ok += 1
            run.items_ok += items
            run.lat.append(time.perf_counter() - start)
            run.done_at.append(end_wall)

    ds = [defer.ensureDeferred(worker(k)) for k in range(concurrency)]
    all_done = defer.DeferredList(ds, consumeErrors=True)
    # bounded: wait for the window, then GRACE_S for in-flight ops, then cancel what is left
    await_until = run.t_stop + GRACE_S
    while not all_done.called and time.time() < await_until:
        await task.deferLater(reactor, min(0.25, max(0.01, await_until - time.time())))
    stopping[0] = True
    if not all_done.called:
        for d in ds:
            if not d.called:
                d.cancel()
        await all_done
    return run


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, fake: Any, provider: Any, ids: list[str]):
        self.args = args
        self.fake = fake
        self.admin = fake.admin
        self.info = fake.info
        self.provider = provider
        self.ids = ids

    def _cpu_marks(self) -> tuple[float, float | None, tuple[int, int]]:
        return cpu_self(), loadgen._proc_cpu_s(self.fake.proc.pid), loadgen._machine_busy()

    def _cpu_fields(self, m0, m1, seconds: float, requests: int) -> dict:
        c_cpu = m1[0] - m0[0]
        t_cpu = (m1[1] - m0[1]) if m0[1] is not None and m1[1] is not None else None
        busy = m1[2][0] - m0[2][0]
        total = max(1, m1[2][1] - m0[2][1])
        machine = 100.0 * (os.cpu_count() or 1) * busy / total
        other = machine - 100.0 * (c_cpu + (t_cpu or 0.0)) / seconds if seconds else None
        return {
            "client_cpu_s": round(c_cpu, 2),
            "client_cpu_pct": round(100.0 * c_cpu / seconds, 1) if seconds else None,
            "client_cpu_us_per_request": round(1e6 * c_cpu / requests, 1) if requests else None,
            "tenant_cpu_pct": round(100.0 * t_cpu / seconds, 1) if t_cpu is not None and seconds else None,
            "tenant_cpu_us_per_request": round(1e6 * t_cpu / requests, 1) if t_cpu is not None and requests else None,
            "machine_cpu_pct": round(machine, 1),
            # everything else on the machine (other processes, loopback softirq): should be near 0
            "other_cpu_pct": round(max(0.0, other), 1) if other is not None else None,
        }

    # -- throughput: get, patch, batch (tenant throttling off, pacing off)

    async def throughput(self, reactor: Any, scenario: str) -> dict:
        from twisted.internet import task

        from ldapsync.graph.client import BatchItem, PacingPolicy

        a = self.args
        self.admin.configure_throttling(enabled=False)
        self.admin.clear_requests()
        client = make_client(self.provider, self.info, reactor, pacing=PacingPolicy(enabled=False),
                             concurrency=a.concurrency)
        ids = self.ids
        seq = [0]

        async def get(rnd):
            await client.get_user(rnd.choice(ids))
            return 1

        async def patch(rnd):
            seq[0] += 1
            await client.update_user(rnd.choice(ids), {"jobTitle": f"Bench {seq[0]}"})
            return 1

        async def batch(rnd):
            seq[0] += 1
            items = [BatchItem("PATCH", f"/users/{uid}", {"jobTitle": f"Bench {seq[0]}.{j}"}, id=str(j + 1))
                     for j, uid in enumerate(rnd.sample(ids, min(a.batch_size, len(ids))))]
            results = await client.batch(items)
            bad = [r for r in results if not r.ok]
            if bad:
                raise bad[0].error  # type: ignore[misc]
            return len(results)

        op = {"get": get, "patch": patch, "batch": batch}[scenario]
        log(f"{scenario}: {a.concurrency} concurrent, {a.warmup}s warm-up + {a.duration}s")
        # CPU marks at the window edges (sampled by a timer on the reactor)
        marks: dict[str, Any] = {}
        stats0: dict[str, int] = {}

        def mark(name: str) -> None:
            marks[name] = self._cpu_marks()
            if name == "start":
                stats0.update(client.stats)
            else:
                marks["stats"] = dict(client.stats)

        c1 = reactor.callLater(a.warmup, mark, "start")
        c2 = reactor.callLater(a.warmup + a.duration, mark, "stop")
        try:
            run = await run_load(reactor, client, op, concurrency=a.concurrency, warmup=a.warmup,
                                 duration=a.duration)
        finally:
            for c in (c1, c2):
                if c.active():
                    c.cancel()
            await client.close()
            await task.deferLater(reactor, 0.2)   # let the pool's connections close
        d = a.duration
        lat = sorted(run.lat)
        http = marks["stats"]["requests"] - stats0["requests"] if "stats" in marks else None
        line: dict[str, Any] = {
            "scenario": scenario,
            "users": len(ids),
            "concurrency": a.concurrency,
            "duration_s": d,
        }
        if scenario == "batch":
            line.update({
                "batch_size": a.batch_size,
                "batches": run.ok,
                "items": run.items_ok,
                "items_per_s": round(run.items_ok / d, 1),
                "http_requests_per_s": round(run.ok / d, 1),
            })
        else:
            line.update({"requests": run.ok, "requests_per_s": round(run.ok / d, 1)})
        line.update({
            "p50_ms": ms(loadgen.percentile(lat, 50)) if lat else None,
            "p99_ms": ms(loadgen.percentile(lat, 99)) if lat else None,
            "errors": run.errors,
        })
        if run.error_kinds:
            line["error_kinds"] = run.error_kinds
        line.update({
            "http_requests_sent": http,
            "retries": marks["stats"]["retries"] - stats0["retries"] if "stats" in marks else None,
            "throttled_429": marks["stats"]["throttled"] - stats0["throttled"] if "stats" in marks else None,
            "pacing": "off",
            "tenant_throttling": "off",
            "warmup_ops": run.warmup_ops,
        })
        if "start" in marks and "stop" in marks:
            line.update(self._cpu_fields(marks["start"], marks["stop"], d, http or run.ok))
        self.admin.clear_requests()
        return line

    # -- sustained writes against a (scaled) write budget

    def scaled_pacing(self, enabled: bool) -> Any:
        """The production pacing for a budget of ``--budget`` writes per ``--window`` s: the
        burst needs no scaling (PacingPolicy sizes it for any window from 15 s on), nor does the
        learned rate's climb after a 429 (a step per 10 s, whatever the window)."""
        from ldapsync.graph.client import PacingPolicy

        a = self.args
        return PacingPolicy(enabled=enabled, writes_per_window=a.budget, window=a.window)

    async def sustained(self, reactor: Any, pacing_on: bool) -> dict:
        from twisted.internet import task

        a = self.args
        duration = a.window * a.windows
        # only the write limit may throttle: resource units out of reach
        self.admin.configure_throttling(enabled=True, writes=a.budget, window=a.window,
                                        resource_units=10**9, ru_window=10.0)
        self.admin.reset_throttling()
        self.admin.clear_requests()
        policy = self.scaled_pacing(pacing_on)
        client = make_client(self.provider, self.info, reactor, pacing=policy, concurrency=a.concurrency)
        ids = self.ids
        seq = [0]

        async def patch(rnd):
            seq[0] += 1
            await client.update_user(rnd.choice(ids), {"jobTitle": f"Paced {seq[0]}"})
            return 1

        log(f"paced ({'pacing on' if pacing_on else 'pacing off'}): {a.concurrency} concurrent, "
            f"budget {a.budget} writes / {a.window:g}s, {a.windows} windows = {duration:g}s")
        m0 = self._cpu_marks()
        marks: dict[str, Any] = {}
        c_stop = reactor.callLater(duration, lambda: marks.update(stop=self._cpu_marks(),
                                                                   stats=dict(client.stats)))
        try:
            run = await run_load(reactor, client, patch, concurrency=a.concurrency, warmup=0,
                                 duration=duration, count_from_start=True)
        finally:
            if c_stop.active():
                c_stop.cancel()
            await client.close()
            await task.deferLater(reactor, 0.2)
        m1 = marks.get("stop") or self._cpu_marks()
        stats = marks.get("stats") or dict(client.stats)
        # the tenant's view: every PATCH it answered in the window (blocking admin call; no load now)
        recs = [r for r in self.admin.requests(method="PATCH", batch_items=False)
                if run.t_measure <= r["time"] <= run.t_stop]
        t_ok = sorted(r["time"] for r in recs if r["status"] == 204)
        t_429 = sum(1 for r in recs if r["status"] == 429)
        max_in_window, j = 0, 0
        for i, t in enumerate(t_ok):          # sliding window over the tenant's accepted writes
            while t_ok[j] <= t - a.window:
                j += 1
            max_in_window = max(max_in_window, i - j + 1)
        per_window = [0] * a.windows
        for t in run.done_at:
            k = min(a.windows - 1, int((t - run.t_measure) // a.window))
            per_window[k] += 1
        budget_rate = a.budget / a.window
        steady = sum(per_window[1:]) / (a.window * (a.windows - 1)) if a.windows > 1 else None
        lat = sorted(run.lat)
        line: dict[str, Any] = {
            "scenario": "paced",
            "pacing": "on" if pacing_on else "off",
            "users": len(ids),
            "concurrency": a.concurrency,
            "budget_writes": a.budget,
            "budget_window_s": a.window,
            "budget_writes_per_s": round(budget_rate, 2),
            "pacer": {"rate_writes_per_s": round(policy.rate, 2), "burst": policy.bucket,
                      "climb_period_s": policy.climb_period} if pacing_on else None,
            "duration_s": duration,
            "windows": a.windows,
            "writes": run.ok,
            "writes_per_s": round(run.ok / duration, 2),
            "ratio_to_budget": round(run.ok / duration / budget_rate, 3),
            "steady_writes_per_s": round(steady, 2) if steady is not None else None,
            "steady_ratio_to_budget": round(steady / budget_rate, 3) if steady is not None else None,
            "writes_per_window": per_window,
            "throttled_429": stats["throttled"],
            "tenant_429": t_429,
            "tenant_writes_accepted": len(t_ok),
            "tenant_max_writes_in_any_window": max_in_window,
            "retries": stats["retries"],
            "errors": run.errors,
        }
        if run.error_kinds:
            line["error_kinds"] = run.error_kinds
        line.update({
            "p50_ms": ms(loadgen.percentile(lat, 50)) if lat else None,
            "p99_ms": ms(loadgen.percentile(lat, 99)) if lat else None,
            "http_requests_sent": stats["requests"],
            "cancelled_at_end": run.cancelled,
        })
        line.update(self._cpu_fields(m0, m1, duration, stats["requests"]))
        self.admin.configure_throttling(enabled=False)
        self.admin.clear_requests()
        return line


async def bench_main(reactor: Any, args: argparse.Namespace, fake: Any, ids: list[str],
                     scenarios: list[str]) -> None:
    from ldapsync.graph.clouds import resolve_endpoints
    from ldapsync.graph.token import ApplicationTokenProvider, ClientCredential

    info = fake.info
    endpoints = resolve_endpoints("global", authority=info["authority"], graph_url=info["graph_url"])
    provider = ApplicationTokenProvider(info["client_id"], endpoints,
                                        ClientCredential("secret", info["client_secret"]),
                                        ca_bundle=info["ca_file"], reactor=reactor)
    t = time.perf_counter()
    c0 = cpu_self()
    await provider.get_token()             # MSAL: OIDC discovery + client_credentials, in a thread
    emit({"scenario": "token", "msal_first_token_ms": ms(time.perf_counter() - t),
          "client_cpu_s": round(cpu_self() - c0, 3),
          "note": "real MSAL ConfidentialClientApplication (client secret) over HTTPS; later calls are memoised"})
    bench = Bench(args, fake, provider, ids)
    for sc in scenarios:
        try:
            if sc in ("get", "patch", "batch"):
                emit(await bench.throughput(reactor, sc))
            elif sc in ("paced", "paced-on"):
                emit(await bench.sustained(reactor, True))
            if sc in ("paced", "paced-off"):
                emit(await bench.sustained(reactor, False))
        except Exception as e:  # noqa: BLE001
            log(f"{sc} failed: {type(e).__name__}: {e}")
            emit({"scenario": sc, "error": f"{type(e).__name__}: {e}"[:2000]})


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10, help="measured seconds per throughput scenario")
    ap.add_argument("--warmup", type=float, default=2, help="unmeasured seconds before each throughput scenario")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent workers, one outstanding op each")
    ap.add_argument("--scenarios", default="get,patch,batch,paced",
                    help="comma list of get, patch, batch, paced (= paced-on then paced-off), paced-on, paced-off")
    ap.add_argument("--users", type=int, default=1000, help="users seeded in the fake tenant")
    ap.add_argument("--batch-size", type=int, default=20, help="items per $batch (Graph allows 20)")
    ap.add_argument("--budget", type=int, default=300, help="write budget of the fake tenant in the paced scenario")
    ap.add_argument("--window", type=float, default=15, help="its window in seconds (Graph: 3000 per 150 s)")
    ap.add_argument("--windows", type=int, default=3, help="windows per paced run (>= 2)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (tenant state, CA, log)")
    ap.add_argument("--workdir", help="parent of the temp dir (default: system temp)")
    args = ap.parse_args(argv)

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown scenario(s): {', '.join(bad)}")
    if not (1 <= args.concurrency <= 256 and 0 < args.duration <= 600 and 0 <= args.warmup <= 60):
        ap.error("--concurrency 1..256, --duration 0..600, --warmup 0..60")
    if not (1 <= args.users <= 100_000 and 1 <= args.batch_size <= 20):
        ap.error("--users 1..100000, --batch-size 1..20")
    if not (2 <= args.windows <= 20 and 1 <= args.budget and 1 <= args.window <= 300):
        ap.error("--windows 2..20, --budget >= 1, --window 1..300")

    from ldapsync.testing.client import FakeTenantProcess

    work = Path(tempfile.mkdtemp(prefix="graphbench-", dir=args.workdir))
    log(f"work dir {work}")
    info = machine_info()
    info["machine"]["background_cpu_pct"] = bg = background_cpu_pct()
    emit(info)
    if bg > 10:
        log(f"WARNING: the machine is already {bg}% busy (100% = one core) before the benchmark; figures will be low")

    fake = FakeTenantProcess(work / "tenant")
    failed = False
    try:
        t = time.monotonic()
        fake.start(timeout=30)
        log(f"fake tenant pid {fake.proc.pid} on {fake.info['base_url']}")
        fake.admin.configure_throttling(enabled=False)
        ids = seed_users(fake.admin, args.users)
        emit({"scenario": "setup", "users": len(ids), "setup_s": round(time.monotonic() - t, 2),
              "tenant_pid": fake.proc.pid, "graph_url": fake.info["graph_url"],
              "note": "users seeded through the fake's admin API (not timed as Graph traffic)"})

        from twisted.internet import task

        task.react(lambda reactor: _run(reactor, args, fake, ids, scenarios))
    except SystemExit as e:
        failed = bool(e.code)
    except Exception as e:  # noqa: BLE001
        failed = True
        log(f"setup failed: {type(e).__name__}: {e}")
        emit({"error": f"{type(e).__name__}: {e}"[:2000]})
    finally:
        if fake.proc is not None:
            log(f"stopping the fake tenant (pid {fake.proc.pid})")
        fake.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def _run(reactor, args, fake, ids, scenarios):
    from twisted.internet import defer

    return defer.ensureDeferred(bench_main(reactor, args, fake, ids, scenarios))


if __name__ == "__main__":
    sys.exit(main())
