#!/usr/bin/env python3
"""What one outbox claim costs, by what waits in the queue (issue 4).

    python tests/perf/bench_outbox_claim.py [--database sqlite|postgresql+psycopg://USER:PW@HOST:PORT/DB]
        [--parked 0,5000,50000] [--kind error|held] [--claims 9]

The worker looks for work with ``claim_users_txn`` (``ldapsync/store/outbox.py``): it walks the
queue in id order to the first ``limit`` users with a ready, due row and an unleased head.  Users
whose rows stopped on a permanent error, and disables held by the guard, stay in the queue until
an admin acts, and every claim passes over them.  For each N in ``--parked`` this builds a fresh
database (SQLite file, or a scratch PostgreSQL database created and dropped on the URL's server)
with N parked users at the head of the queue and 100 ready users after them, and times
``--claims`` claims of 16 users (each in a write transaction that is rolled back, so every claim
sees the same queue), for both forms of the claim: ``full`` (users with any ready row that is
due; the worker runs it at least once a second) and ``fast`` (users whose oldest row is ready and
due; the worker's usual claim).  On SQLite a claim is a write transaction: LDAP writes wait
behind it.

Prints a ``machine`` line and one JSON line per N.  A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_graph  # machine_info
from bench_propagation import create_pg_database, drop_pg_database

INSERT = ("INSERT INTO o365_outbox (entry_uuid, created_at, operation, payload, state, next_attempt_at,"
          " lease_owner, lease_until) VALUES (?, 0, 'update', '{}', ?, 0, NULL, NULL)")
READY_USERS = 100
LIMIT = 16


class Rollback(Exception):
    """Leaves the claim's transaction without committing its leases."""


def measure(url: str, parked: int, kind: str, claims: int, full: bool) -> dict:
    from ldapsync.store import outbox
    from ldapsync.store.database import Database

    db = Database(url)
    try:
        db.create_schema()
        rows = [(f"parked-{i:06d}", kind, ) for i in range(parked)] + [(f"ready-{i:04d}", "ready") for i in range(READY_USERS)]
        db.run_sync("fill", lambda txn: txn.run_many(INSERT, rows))
        now = time.time()
        times: list[float] = []
        got: list[str] = []

        def claim(txn):
            got[:] = outbox.claim_users_txn(txn, "bench", now, 60.0, LIMIT, full=full)
            raise Rollback

        for _ in range(claims):
            t0 = time.perf_counter()
            try:
                db.run_sync("claim", claim)
            except Rollback:
                pass
            times.append((time.perf_counter() - t0) * 1000.0)
        if got != [f"ready-{i:04d}" for i in range(LIMIT)]:
            raise RuntimeError(f"the claim took {got[:4]}..., not the first ready users")
        return {"claim": "full" if full else "fast", "parked": parked, "kind": kind, "ready_users": READY_USERS, "limit": LIMIT, "claims": claims,
                "median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3),
                "max_ms": round(max(times), 3)}
    finally:
        db.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--database", default="sqlite", help="sqlite, or a PostgreSQL URL whose user may CREATE DATABASE")
    ap.add_argument("--parked", default="0,5000,50000", help="comma list: users parked at the head of the queue")
    ap.add_argument("--kind", choices=("error", "held"), default="error")
    ap.add_argument("--claims", type=int, default=9)
    ap.add_argument("--forms", default="fast,full", help="which claims: fast, full or both")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.parked.split(",") if x.strip()]
    if not sizes or not all(0 <= n <= 500_000 for n in sizes) or not 1 <= args.claims <= 1000:
        ap.error("--parked: numbers 0..500000; --claims 1..1000")
    if args.database != "sqlite" and not args.database.startswith("postgresql"):
        ap.error("--database: sqlite or a postgresql+psycopg:// URL")
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    if not forms or not set(forms) <= {"fast", "full"}:
        ap.error("--forms: fast, full or fast,full")
    print(json.dumps(bench_graph.machine_info()), flush=True)
    for n, form in [(n, f) for n in sizes for f in forms]:
        full = form == "full"
        if args.database == "sqlite":
            with tempfile.TemporaryDirectory(prefix="claimbench-") as d:
                line = measure(f"sqlite:///{d}/o.db", n, args.kind, args.claims, full)
            line["database"] = "sqlite"
        else:
            name, url = create_pg_database(args.database, prefix="claimbench")
            try:
                line = measure(url, n, args.kind, args.claims, full)
            finally:
                drop_pg_database(args.database, name)
            line["database"] = "postgresql"
        print(json.dumps({"scenario": "claim", **line}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
